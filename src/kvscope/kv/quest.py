"""``quest``: query-aware page selection over a GPU-resident paged cache (Quest, Tang et al., ICML 2024,
"Quest: Query-Aware Sparsity for Efficient Long-Context LLM Inference").

All KV stays in ``paged``'s block pool (prefix caching, copy-on-write, swap, fork: all ``paged``'s).
A page is a block. Beside the KV each block keeps, per layer and KV head, the elementwise min and
max of its keys (``kv/quest_pages.py``), updated as tokens are written. At each decode step every KV
head scores its request's pages by the upper bound of ``q . k`` over the page and attends only to
its top pages within the token budget, the first and the last (current) page always among them
(``kv/quest_attention.py``). Heads may read different pages. Prefill chunks attend fully.

What it saves is bandwidth, not memory: decode reads ``budget`` tokens' K/V (rounded up to whole
pages) plus one bound pair per page, instead of the whole context; the pool holds every token, and
the bounds take as much memory as one more token per page.

Pure-decode steps on the Triton backend replay CUDA graphs (``kv/quest_graphs.py``): ``paged``'s
static block-table buffers, the pages per row computed on the device from the lengths, a top-k of
fixed width masked per row, so a captured step selects exactly the eager step's pages.

Quest and ``infinigen`` select the same way, by an estimate of ``q . k`` per KV head, and read only
what they select. They differ in where the KV lives: InfiniGen keeps it in host memory and
speculates one layer ahead, so that the selected rows can cross PCIe while the previous layer
computes (the selection decides what is copied); Quest keeps it on the GPU and selects with the
layer's own query, exactly bounded per page (the selection decides what the kernel reads).
"""
from __future__ import annotations

import math
from typing import Any

import torch

from kvscope.constants import DEFAULT_BUDGET_RATIO
from kvscope.errors import ConfigError
from kvscope.kv.backend import GraphDecode
from kvscope.kv.base import BlockTableLayout, GraphStatistics, KVSetup, StepBatch
from kvscope.kv.block_pool import BlockPool
from kvscope.kv.eviction_budget import check_budget_args
from kvscope.kv.paged import PagedStrategy
from kvscope.kv.quest_attention import QuestAttention
from kvscope.kv.quest_pages import PageBounds
from kvscope.kv.registry import register
from kvscope.kv.slot_cache import SlotKVCache
from kvscope.models.base import AttentionBackend
from kvscope.request import Request


@register
class QuestStrategy(PagedStrategy):
    """Quest. Args: ``budget`` (tokens read per decode step and KV head) or ``budget_ratio`` (share
    of the request's context; default 0.2), each rounded up to whole pages, never fewer than the
    first and last page; ``page_size`` (tokens per page = the pool's block size, 16);
    ``enable_prefix_caching`` (as ``paged``)."""

    name = "quest"
    lossless = False
    selects_per_step = True
    drops_under_pressure = False  # every token stays resident whatever the pool holds

    def __init__(self, budget: int | None = None, budget_ratio: float | None = None, page_size: int = 16,
                 enable_prefix_caching: bool = True) -> None:
        if not isinstance(page_size, int) or isinstance(page_size, bool) or page_size <= 0:
            raise ConfigError(f"quest: page_size must be a positive integer, got {page_size!r}")
        super().__init__(block_size=page_size, enable_prefix_caching=enable_prefix_caching)
        check_budget_args(self.name, budget_ratio, None, budget, None, page_size)  # the eviction policies' checks
        if budget is None and budget_ratio is None:
            budget_ratio = DEFAULT_BUDGET_RATIO
        self.budget = budget
        self.budget_ratio = budget_ratio
        self.page_size = page_size
        self.pages_read = 0  # over decode rows: pages read per KV head and layer
        self.pages_held = 0  # over the same rows: pages they hold

    # ---- facts -----------------------------------------------------------------------------------
    def kept_share(self, prompt_tokens: int | None = None) -> float | None:
        """Share of the context read per decode step (all of it stays resident): the ratio budget;
        for a budget in tokens ``budget / prompt_tokens`` (capped at 1), None without a prompt length."""
        if self.budget is None:
            return self.budget_ratio
        if not prompt_tokens:
            return None
        return min(1.0, self.budget / prompt_tokens)

    @classmethod
    def args_for_share(cls, share: float) -> dict[str, Any] | None:
        return {"budget_ratio": share}

    def keep_pages(self, context: int) -> int:
        """Pages each KV head of a decode row with ``context`` tokens (the new one included) reads."""
        held = -(-context // self.page_size)
        tokens = self.budget if self.budget is not None else self.budget_ratio * context
        return min(held, max(math.ceil(tokens / self.page_size), 2))

    def keep_pages_tensor(self, context: torch.Tensor) -> torch.Tensor:
        """:meth:`keep_pages` of every context of ``context`` ``[B]`` (integer, >= 1) on its device,
        with no host sync (a captured step's rows): ``[B]`` int64. The ratio budget takes the same
        float64 operations in the same order as the host's, so it rounds alike."""
        held = (context.long() + self.page_size - 1) // self.page_size
        if self.budget is not None:
            return held.clamp(max=max(math.ceil(self.budget / self.page_size), 2))
        want = torch.ceil(context.double() * self.budget_ratio / self.page_size).long()
        return torch.minimum(held, want.clamp(min=2))

    def count_decode(self, contexts: list[int]) -> None:
        """Count decode rows of ``contexts`` tokens (the new one included) in ``quest_pages_read``
        and ``quest_pages_held``."""
        self.pages_read += sum(map(self.keep_pages, contexts))
        self.pages_held += sum(-(-c // self.page_size) for c in contexts)

    def decode_read_bytes(self, context: int) -> int | None:
        """The key bounds of every page held, then per KV head its ``keep_pages`` selected pages'
        K and V (the last page, always selected, only as far as it is filled)."""
        held = -(-context // self.page_size)
        tokens = context - (held - self.keep_pages(context)) * self.page_size
        kv = self.cache.kv
        return tokens * kv[:, :, 0].numel() * kv.element_size() + held * self.bounds.nbytes // self.bounds.kmin.shape[1]

    # ---- memory --------------------------------------------------------------------------------------
    def bind(self, setup: KVSetup) -> None:
        m = setup.model
        block_bytes = m.kv_bytes_per_token(setup.dtype) * self.block_size
        bound_bytes = PageBounds.bytes_per_block(m.num_layers, m.num_kv_heads, m.head_dim, setup.dtype)
        num_blocks = setup.kv_memory_bytes // (block_bytes + bound_bytes)
        if num_blocks < 1:
            raise ConfigError(f"quest: kv_memory_bytes={setup.kv_memory_bytes} is smaller than one page "
                              f"({block_bytes + bound_bytes} bytes with its key bounds)")
        pool = BlockPool(num_blocks, enable_caching=self.enable_prefix_caching)
        self.bind_shared(setup, pool, SlotKVCache(m, num_blocks * self.block_size, setup.device, setup.dtype))

    def bind_shared(self, setup: KVSetup, pool: BlockPool, cache: SlotKVCache) -> None:
        """As ``paged``'s, plus the page bounds of every block of ``pool``."""
        super().bind_shared(setup, pool, cache)
        m = setup.model
        if setup.attention_backend == "triton" and pool.num_blocks * self.block_size * m.num_kv_heads >= 1 << 31:
            raise ConfigError("quest: the Triton path addresses (block, KV head) pairs with int32 ids; "
                              "this pool has too many, use a smaller kv_memory_bytes")
        self.bounds = PageBounds(m.num_layers, pool.num_blocks, m.num_kv_heads, m.head_dim, self.block_size,
                                 setup.device, setup.dtype)

    # ---- scheduler side: what moves KV moves its bounds --------------------------------------------
    def _copy_on_write(self, table: list[int], index: int) -> None:
        old = table[index]
        super()._copy_on_write(table, index)
        self.bounds.copy(old, table[index])

    def swap_in(self, request: Request) -> int | None:
        moved = super().swap_in(request)
        if moved is not None:
            self.bounds.recompute(self.cache, self.tables[request.request_id], self._reqs[request.request_id].held)
        return moved

    def stats(self) -> dict[str, Any]:
        return {
            **super().stats(),
            "quest_bound_bytes": self.bounds.nbytes,
            "quest_pages_read": self.pages_read,
            "quest_pages_held": self.pages_held,
        }

    # ---- model side ----------------------------------------------------------------------------------
    def begin_step(self, batch: StepBatch) -> AttentionBackend:
        attn = QuestAttention(
            self.cache, self.bounds, [self.tables[req.request_id] for req in batch.requests], self.block_size,
            [req.num_computed_tokens for req in batch.requests], batch.query_start, self.scale, self.keep_pages,
            self.setup.attention_backend,
        )
        self.pages_read += attn.pages_read
        self.pages_held += attn.pages_held
        return attn

    # ---- captured decode (kv/quest_graphs.py) -------------------------------------------------------
    def block_table_layout(self) -> BlockTableLayout | None:
        return BlockTableLayout(self.cache, self.block_size)

    def static_attention(self, layout: BlockTableLayout, slots: torch.Tensor, tables: torch.Tensor,
                         lens: torch.Tensor, scale: float, num_splits: int,
                         stats: GraphStatistics | None) -> AttentionBackend:
        # ``num_splits`` is paged's, for b sequences of W blocks; quest's kernel runs b * Hkv one-head
        # sequences of its selected pages, whose split count follows from those fixed shapes.
        from kvscope.kv.quest_graphs import StaticQuestAttention

        return StaticQuestAttention(self, slots, tables, lens, scale)

    def decode_graphs(self) -> GraphDecode | None:
        """Captured decode steps on the Triton backend. The torch path's scores gather every
        page's bounds of the bucket's whole block-table width, by ``max_model_len`` rather than by
        context, so it stays eager (it runs the same static steps on the CPU, in tests)."""
        setup = self.setup
        if setup is None or not setup.cuda_graph_sizes or setup.attention_backend != "triton":
            return None
        from kvscope.kv.quest_graphs import QuestGraphs

        return QuestGraphs(self, setup.cuda_graph_sizes, setup.max_model_len, setup.device)
