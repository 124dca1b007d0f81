"""Quest's page metadata and page selection (Tang et al., 2024; used by ``kv/quest.py``).

A page is one block of the paged pool. Beside the KV, every block keeps, per layer and KV head, the
elementwise minimum and maximum of its tokens' keys. For a query ``q`` the largest ``q . k`` any
key of the page can reach is bounded by ``sum_d max(q_d min_d, q_d max_d)``, which, since
``min_d <= max_d``, equals ``q+ . max + q- . min`` (``q+`` / ``q-`` the positive / negative parts of
``q``): two matrix products, no ``[.., D]`` intermediate per page.

Grouped-query attention: a KV head's pages are read for all ``G`` query heads of its group at once,
so a page must be read if *any* of them may attend to it strongly. The KV head's score of a page is
the maximum of its query heads' bounds: it is still an upper bound on every one of their ``q . k``
over the page (a sum would not be, and would let one head's many moderate bounds outrank another
head's single large one, which is the token that head's softmax is dominated by).
"""
from __future__ import annotations

import torch

from kvscope.kv.slot_cache import SlotKVCache


class PageBounds:
    """Per-block key bounds ``kmin`` / ``kmax``: ``[num_layers, num_blocks, Hkv, D]`` each, in the
    cache's dtype (the min and max of stored values are stored values: nothing is rounded).

    A block's bounds are valid for the tokens written to it since its first token (offset 0) was
    written: writing offset 0 resets them, so a block reused after free starts afresh.
    """

    def __init__(self, num_layers: int, num_blocks: int, num_kv_heads: int, head_dim: int, block_size: int,
                 device: torch.device, dtype: torch.dtype) -> None:
        shape = (num_layers, num_blocks, num_kv_heads, head_dim)
        self.kmin = torch.zeros(shape, dtype=dtype, device=device)
        self.kmax = torch.zeros(shape, dtype=dtype, device=device)
        self.block_size = block_size

    @property
    def nbytes(self) -> int:
        return 2 * self.kmin.numel() * self.kmin.element_size()

    @staticmethod
    def bytes_per_block(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        """Device bytes of one block's bounds (as many as one token's K and V)."""
        return 2 * num_layers * num_kv_heads * head_dim * torch.empty(0, dtype=dtype).element_size()

    def update(self, layer: int, slots: torch.Tensor, k: torch.Tensor, first: torch.Tensor | None) -> None:
        """Fold the keys ``k`` ``[N, Hkv, D]`` just written at ``slots`` ``[N]`` into their blocks'
        bounds. ``first``: the rows of ``k`` written at a block's offset 0 (those blocks start from
        that token), or None when there is none; the caller knows them on the host, which spares a
        device sync per layer."""
        blocks = slots // self.block_size
        k = k.to(self.kmin.dtype)
        kmin, kmax = self.kmin[layer], self.kmax[layer]
        if first is not None:
            kmin.index_copy_(0, blocks[first], k[first])
            kmax.index_copy_(0, blocks[first], k[first])
        index = blocks[:, None, None].expand_as(k)
        kmin.scatter_reduce_(0, index, k, reduce="amin")
        kmax.scatter_reduce_(0, index, k, reduce="amax")

    def update_rows(self, layer: int, blocks: torch.Tensor, first: torch.Tensor, k: torch.Tensor) -> None:
        """:meth:`update` for one key per row with static shapes (a captured decode step): row
        ``i``'s key ``k[i]`` ``[Hkv, D]`` was written to block ``blocks[i]`` ``[N]`` (int64), at its
        offset 0 where ``first[i]`` ``[N, 1, 1]`` (bool; that block then starts from the key). Rows
        write distinct blocks, or repeat another row's block, flag and key exactly (a captured
        step's padding rows repeat its first row): duplicates then store equal values."""
        k = k.to(self.kmin.dtype)
        for bound, fold in ((self.kmin[layer], torch.minimum), (self.kmax[layer], torch.maximum)):
            bound.index_copy_(0, blocks, torch.where(first, k, fold(bound[blocks], k)))

    def copy(self, src: int, dst: int) -> None:
        """Block ``dst`` takes block ``src``'s bounds (copy-on-write copies the KV with them)."""
        self.kmin[:, dst] = self.kmin[:, src]
        self.kmax[:, dst] = self.kmax[:, src]

    def recompute(self, cache: SlotKVCache, blocks: list[int], num_tokens: int) -> None:
        """Bounds of ``blocks`` (a request's table, in order) from the keys of their first
        ``num_tokens`` tokens in ``cache`` (after KV was written wholesale: swap-in)."""
        bs = self.block_size
        for i, block in enumerate(blocks[: -(-num_tokens // bs)]):
            n = min(bs, num_tokens - i * bs)
            keys = cache.kv[:, 0, block * bs : block * bs + n]  # [L, n, Hkv, D]
            self.kmin[:, block] = keys.amin(dim=1)
            self.kmax[:, block] = keys.amax(dim=1)


def page_scores(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor) -> torch.Tensor:
    """Upper bound of ``q . k`` over each page, per KV head.

    Args:
        q: ``[B, Hq, D]`` queries (``Hq`` a multiple of ``Hkv``; unscaled).
        kmin, kmax: ``[B, P, Hkv, D]`` the bounds of each row's ``P`` pages.
    Returns:
        ``[B, Hkv, P]`` float32: per KV head, the maximum over its group's query heads of
        ``sum_d max(q_d kmin_d, q_d kmax_d)``.
    """
    b, hq, d = q.shape
    hkv = kmin.shape[2]
    qg = q.float().view(b, hkv, hq // hkv, d)
    lo = kmin.float().permute(0, 2, 3, 1)  # [B, Hkv, D, P]
    hi = kmax.float().permute(0, 2, 3, 1)
    bound = qg.clamp(min=0) @ hi + qg.clamp(max=0) @ lo  # [B, Hkv, G, P]
    return bound.amax(dim=2)


class PageSelection:
    """Per row and KV head, the ``keep`` pages of highest score, the first and last always among
    them: what depends only on the rows is built once per step, :meth:`select` runs per layer.

    Args:
        num_pages: ``[B]`` pages each row holds (>= 1).
        keep: ``[B]`` pages to read per KV head, each in ``min(2, num_pages) .. num_pages``.
        width: ``P``, the pages scored per row (its table's width).
        k: at least ``max(keep)``, at most ``P``: the places returned (an eager step's ``max(keep)``;
            a captured step's a constant, as no shape may depend on the data).

    A top-``k`` rather than a full sort, exact and with no host sync: each score becomes an int64
    key that orders as the float does (its bits, negatives' magnitudes negated; -0 and +0 equal)
    and, below that, by the lower page index, so no two keys tie and ``topk`` has one answer.
    """

    def __init__(self, num_pages: torch.Tensor, keep: torch.Tensor, width: int, k: int) -> None:
        cols = torch.arange(width, device=num_pages.device)
        self.forced = ((cols == 0) | (cols == num_pages[:, None] - 1))[:, None, :]  # [B, 1, P]
        self.dead = (cols >= num_pages[:, None])[:, None, :]  # [B, 1, P]: past the row's pages
        self.tiebreak = width - 1 - cols  # [P]: the lower page ranks first among equal scores
        self.unkept = (torch.arange(k, device=keep.device) >= keep[:, None])[:, None, :]  # [B, 1, k]
        self.width, self.k = width, k

    def select(self, scores: torch.Tensor) -> torch.Tensor:
        """``scores`` ``[B, Hkv, P]`` (any value past a row's pages) -> ``[B, Hkv, k]`` page indices,
        ascending in each row's first ``keep[b]`` places (so the last page, the only partial one,
        comes last); later places hold ``P``."""
        ranked = scores.float().masked_fill(self.forced, float("inf")).masked_fill(self.dead, float("-inf"))
        bits = ranked.view(torch.int32).long()
        key = torch.where(bits < 0, -(bits & 0x7FFFFFFF), bits) * self.width + self.tiebreak
        top = key.topk(self.k, dim=-1).indices  # best first
        return top.masked_fill(self.unkept, self.width).sort(dim=-1).values
