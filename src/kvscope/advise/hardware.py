"""What the advisor needs to know about a machine: memory, bandwidths and matmul rate.

Presets say which figures were measured (and where) and which come from a datasheet or are rough
estimates. ``this`` detects the machine the advisor runs on.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from kvscope.errors import ConfigError

GB = 1e9
GiB = 1 << 30


@dataclass(frozen=True)
class Hardware:
    """One accelerator (or the CPU) as the cost model sees it.

    Attributes:
        name: label shown in the advice.
        memory_bytes: memory for weights + KV + activations (bytes): the GPU's HBM, or on a CPU the
            host memory the engine may use.
        hbm_bytes_per_s: rate at which a decode step streams weights and KV (bytes/s): device copy
            bandwidth on a GPU, DRAM bandwidth on a CPU.
        host_device_bytes_per_s: host <-> device copy rate (bytes/s) for pinned memory; what
            ``offload`` and ``infinigen`` fetch through. On a CPU the host is the device: DRAM rate.
        matmul_flops_per_s: dense matmul rate (FLOP/s) in the serving dtype.
        host_memory_bytes: host memory (bytes) that offloaded KV may occupy.
        step_overhead_s_per_layer: fixed time per decoder layer per engine step (seconds): launch and
            Python overhead, independent of batch and context, of a step replayed from a CUDA graph
            on a GPU (of every step on a CPU). The cost model's one fitted knob per hardware (see
            ``benchmarks/advise_calibration.py``).
        eager_step_overhead_s_per_layer: the same for a step the engine runs eagerly (a step with a
            prefill chunk, every step of a strategy without graphs); measured apart from the study
            rows. None (the default) takes ``step_overhead_s_per_layer``, as where nothing is replayed (CPU).
        speculation_s_per_layer: ``infinigen``'s fixed cost per sparse layer per step (seconds):
            speculation, top-k and gather launches, measured apart from the study rows.
        interconnect_bytes_per_s: per-direction link rate between two ranks (bytes/s) that a ring
            all-reduce sees (NVLink on a GPU node; loopback TCP between CPU processes).
        allreduce_latency_s: fixed cost of one all-reduce (seconds), whatever its size.
        dtype: the dtype kvscope serves in on this hardware (``bfloat16`` on GPUs, ``float32`` on CPU).
        is_gpu: whether KV can be offloaded to a separate host memory.
        sources: where each figure comes from (``measured: ...``, ``datasheet``, ``rough estimate``).
    """

    name: str
    memory_bytes: int
    hbm_bytes_per_s: float
    host_device_bytes_per_s: float
    matmul_flops_per_s: float
    host_memory_bytes: int
    step_overhead_s_per_layer: float
    speculation_s_per_layer: float
    dtype: str
    is_gpu: bool
    sources: dict[str, str] = dataclasses.field(default_factory=dict)
    eager_step_overhead_s_per_layer: float | None = None  # None: step_overhead_s_per_layer
    interconnect_bytes_per_s: float = 450 * GB
    allreduce_latency_s: float = 15e-6

    def __post_init__(self) -> None:
        for f in ("memory_bytes", "hbm_bytes_per_s", "host_device_bytes_per_s", "matmul_flops_per_s",
                  "host_memory_bytes", "interconnect_bytes_per_s"):
            value = getattr(self, f)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ConfigError(f"hardware.{f}: must be a positive number, got {value!r}")
        if self.eager_step_overhead_s_per_layer is None:
            object.__setattr__(self, "eager_step_overhead_s_per_layer", self.step_overhead_s_per_layer)
        for f in ("step_overhead_s_per_layer", "speculation_s_per_layer", "eager_step_overhead_s_per_layer",
                  "allreduce_latency_s"):
            if not getattr(self, f) >= 0:
                raise ConfigError(f"hardware.{f}: must be >= 0, got {getattr(self, f)!r}")

    def with_step_overhead(self, seconds_per_layer: float) -> "Hardware":
        """A copy with the replayed-step overhead set to ``seconds_per_layer`` and the eager one
        moved with it (the measured difference between them kept)."""
        extra = self.eager_step_overhead_s_per_layer - self.step_overhead_s_per_layer
        return dataclasses.replace(self, step_overhead_s_per_layer=seconds_per_layer,
                                   eager_step_overhead_s_per_layer=seconds_per_layer + extra)

    def with_overrides(self, **overrides: float | int | None) -> "Hardware":
        """A copy with the given fields replaced (None values are ignored); sources say ``user``."""
        given = {k: v for k, v in overrides.items() if v is not None}
        unknown = sorted(set(given) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ConfigError(f"hardware.{unknown[0]}: not a hardware field")
        if not given:
            return self
        sources = {**self.sources, **{k: "user override" for k in given}}
        return dataclasses.replace(self, **given, sources=sources)


# infinigen's per-step cost beyond its transfers in serving. First measured on an H200 as an eager
# decode step (batch 1 x 4096, Llama-3-8B shapes: 99.1 ms against paged's 21.0 ms and a 2.4 ms
# fetch, i.e. 2.5 ms per sparse layer). Pure decode steps replayed from CUDA graphs now cost nothing
# beyond paged's step and the fetch (within 0.2 ms a layer over batch 1-16 x 4k-32k on an H100,
# benchmarks/results/offload_decode.json), but served steps that mix prefill chunks with decodes run
# the eager ragged path; 2.5 ms still fits the H100 study rows (median TPOT error 26% for infinigen
# in benchmarks/results/advise_calibration.md, against 75% with 0).
GPU_SPECULATION_S_PER_LAYER = 2.5e-3

# Calibration knob, fitted by benchmarks/advise_calibration.py on one point per hardware (paged,
# memory-rich pool, all requests at once on the H100; kvscope paged at batch 1 in
# benchmarks/results/cpu_generate.json on the CPU) and reported there with the errors elsewhere.
H100_STEP_OVERHEAD_S_PER_LAYER = 0.123e-3
CPU_STEP_OVERHEAD_S_PER_LAYER = 1.242e-3
# What an eager step costs per layer beyond a replayed one, on an H100: benchmarks/results/
# decode_step.md (engine step, eager minus CUDA graphs, Llama-3.1-8B's 32 layers; median over its six
# shapes of 7.7-20.5 ms) = 16.9 ms / 32 layers.
H100_EAGER_EXTRA_S_PER_LAYER = 0.53e-3

# benchmarks/results/gpu_ceilings.json, measured 2026-11-27 on an NVIDIA H100 80GB HBM3 (torch 2.11):
# device-to-device copy 2920 GB/s, pinned host->device 55.0 GB/s, bf16 matmul 8192^3 779 TFLOP/s,
# device memory 85,017,493,504 bytes.
H100 = Hardware(
    name="h100",
    memory_bytes=85_017_493_504,
    hbm_bytes_per_s=2920 * GB,
    host_device_bytes_per_s=55.0 * GB,
    matmul_flops_per_s=779e12,
    host_memory_bytes=128 * GiB,
    step_overhead_s_per_layer=H100_STEP_OVERHEAD_S_PER_LAYER,
    speculation_s_per_layer=GPU_SPECULATION_S_PER_LAYER,
    eager_step_overhead_s_per_layer=H100_STEP_OVERHEAD_S_PER_LAYER + H100_EAGER_EXTRA_S_PER_LAYER,
    dtype="bfloat16",
    is_gpu=True,
    sources={
        "memory_bytes": "measured (gpu_ceilings.json, 2026-11-27)",
        "hbm_bytes_per_s": "measured device copy (gpu_ceilings.json, 2026-11-27)",
        "host_device_bytes_per_s": "measured pinned h2d (gpu_ceilings.json, 2026-11-27)",
        "matmul_flops_per_s": "measured bf16 8192^3 (gpu_ceilings.json, 2026-11-27)",
        "host_memory_bytes": "assumed (128 GiB host)",
        "step_overhead_s_per_layer": "fitted (advise_calibration)",
        "speculation_s_per_layer": "eager infinigen step minus paged step and fetch (H200), checked on the H100 study",
        "eager_step_overhead_s_per_layer": "fitted knob + measured eager minus graph step (decode_step.md)",
        "interconnect_bytes_per_s": "datasheet (NVLink 4: 450 GB/s per direction); not measured",
        "allreduce_latency_s": "rough estimate (NCCL small all-reduce within a node)",
    },
)

# H200: pinned host->device 55.3 GB/s measured in benchmarks/results/offload_decode.json
# (2026-11-27) and the memory that run reported (150,109,880,320 bytes); HBM3e bandwidth 4.8 TB/s is
# the datasheet figure (the H100's measured copy rate is 87% of its 3.35 TB/s datasheet figure, so
# expect less); matmul rate: same SMs and clocks as the H100, so the H100's measured rate.
H200 = dataclasses.replace(
    H100,
    name="h200",
    memory_bytes=150_109_880_320,
    hbm_bytes_per_s=4800 * GB,
    host_device_bytes_per_s=55.3 * GB,
    sources={
        **H100.sources,
        "memory_bytes": "measured (offload_decode.json, 2026-11-27)",
        "hbm_bytes_per_s": "datasheet (4.8 TB/s)",
        "host_device_bytes_per_s": "measured pinned h2d (offload_decode.json, 2026-11-27)",
        "matmul_flops_per_s": "H100 measured rate (same compute as the H100)",
        "step_overhead_s_per_layer": "H100's fitted value",
        "eager_step_overhead_s_per_layer": "H100's value",
    },
)

# Rough per-core figures for a current x86 server core running torch float32: an AVX-512 core with
# two FMA units does 64 float32 FLOP a cycle, 160 GFLOP/s at 2.5 GHz, and sgemm holds about half of
# that through a prefill's matmuls; a share of the socket's DRAM bandwidth. Estimates, not
# measurements. The earlier 40 GFLOP/s (half an AVX2 core's peak) is ruled out by the quick study's
# rows (docs/results/quick): at 4 req/s, snapkv (no prefix caching) served at least 14 of its 16
# requests, among them at least 6 of its 8 needle prompts of 204-210 tokens, within a TTFT of 347 ms
# (its p90), while 210 tokens' matmuls are 44.6 GFLOP: over 128 GFLOP/s on the 2 cores, 64 per
# core, before any per-layer or weight-read time. 80 was picked among the values above that bound
# with the rows in view (40: 26% / 56% / 171% median error, 80: 3% / 9% / 15%, 120: 12% / 24% / 26%),
# so the calibration on these rows is not an independent check of it.
CPU_FLOPS_PER_CORE = 80e9
CPU_BYTES_PER_S_PER_CORE = 8 * GB


def _cpu_memory_bytes() -> int:
    """Physical memory of this machine (bytes), from sysconf; 16 GiB where that is unavailable."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 16 * GiB


def cpu_hardware(cores: int | None = None, memory_bytes: int | None = None) -> Hardware:
    """This machine's CPU: cores from the scheduler affinity (or ``os.cpu_count``), memory from sysconf.

    Bandwidth and matmul rate scale with the cores from rough per-core constants
    (:data:`CPU_FLOPS_PER_CORE`, :data:`CPU_BYTES_PER_S_PER_CORE`).
    """
    if cores is None:
        try:
            cores = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            cores = os.cpu_count() or 1
    memory = memory_bytes if memory_bytes is not None else _cpu_memory_bytes()
    bandwidth = CPU_BYTES_PER_S_PER_CORE * cores
    return Hardware(
        name=f"cpu ({cores} cores)",
        memory_bytes=memory,
        hbm_bytes_per_s=bandwidth,
        host_device_bytes_per_s=bandwidth,
        matmul_flops_per_s=CPU_FLOPS_PER_CORE * cores,
        host_memory_bytes=memory,
        step_overhead_s_per_layer=CPU_STEP_OVERHEAD_S_PER_LAYER,
        # Not measured on a CPU: the GPU figure is launch-bound and does not carry over.
        speculation_s_per_layer=0.0,
        # gloo between two processes of one machine (loopback TCP), fitted as latency + bytes / rate
        # to all-reduces of 2 KiB-32 MiB (benchmarks/results/tp_allreduce_cpu.md, 2 cores).
        interconnect_bytes_per_s=1.5 * GB,
        allreduce_latency_s=450e-6,
        dtype="float32",
        is_gpu=False,
        sources={
            "memory_bytes": "detected (sysconf)",
            "hbm_bytes_per_s": f"rough estimate ({CPU_BYTES_PER_S_PER_CORE / GB:.0f} GB/s per core)",
            "host_device_bytes_per_s": "same memory as the device",
            "matmul_flops_per_s": f"rough estimate ({CPU_FLOPS_PER_CORE / 1e9:.0f} GFLOP/s per core)",
            "host_memory_bytes": "detected (sysconf)",
            "step_overhead_s_per_layer": "fitted (advise_calibration, cpu_generate.json)",
            "speculation_s_per_layer": "not measured on CPU (0)",
            "eager_step_overhead_s_per_layer": "step_overhead_s_per_layer (no CUDA graphs on a CPU)",
            "interconnect_bytes_per_s": "measured (tp_allreduce_cpu.md: gloo, 2 ranks, 2 cores)",
            "allreduce_latency_s": "measured (tp_allreduce_cpu.md: gloo, 2 ranks, 2 cores)",
        },
    )


def detect() -> Hardware:
    """The machine the advisor runs on: the first CUDA device if there is one, else the CPU.

    A GPU's memory and SM count come from its device properties; bandwidths and matmul rate come
    from the H100 or H200 preset whose name matches, otherwise from the H100's, scaled by SM count.
    """
    import torch

    if not torch.cuda.is_available():
        return cpu_hardware()
    props = torch.cuda.get_device_properties(0)
    base = H200 if "H200" in props.name else H100
    scale = 1.0 if "H100" in props.name or "H200" in props.name else props.multi_processor_count / 132
    return dataclasses.replace(
        base,
        name=props.name,
        memory_bytes=int(props.total_memory),
        hbm_bytes_per_s=base.hbm_bytes_per_s * scale,
        matmul_flops_per_s=base.matmul_flops_per_s * scale,
        host_memory_bytes=_cpu_memory_bytes(),
        sources={**base.sources, "memory_bytes": "detected (CUDA device properties)",
                 "host_memory_bytes": "detected (sysconf)"},
    )


PRESETS = ("h100", "h200", "cpu", "this")


def hardware_preset(name: str) -> Hardware:
    """``h100``, ``h200``, ``cpu`` (this machine's CPU) or ``this`` (detected)."""
    if name == "h100":
        return H100
    if name == "h200":
        return H200
    if name == "cpu":
        return cpu_hardware()
    if name == "this":
        return detect()
    raise ConfigError(f"hardware: unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
