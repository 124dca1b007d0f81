"""Tensor parallelism: one process per rank over ``torch.distributed`` (gloo on CPU, NCCL on CUDA).
See docs/architecture.md, "Tensor parallelism"."""
