"""The online-softmax update with which every attention kernel folds in its key tiles (base 2).

A kernel keeps, per query row, the running maximum ``m`` and sum ``l`` ``[M]`` (float32) of its
scores and the weighted sum of values ``acc`` ``[M, D]``. Scores arrive a tile ``s`` ``[M, N]`` at
a time, already scaled by ``log2(e) / sqrt(D)`` (so ``exp2`` is the softmax's ``exp``) and with
masked keys at ``-inf``. The value product is left to the kernel: some take it through
``tl.dot``, some through a reduction, some scale it afterwards.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def softmax_step(s, m, l):
    """Rescale the state ``(m, l)`` to a tile of scores ``s`` ``[M, N]``.

    Returns ``p`` ``[M, N]`` (the tile's unnormalised weights), ``alpha`` ``[M]`` (the factor
    ``acc`` is to be multiplied by before ``p @ v`` is added), and the new ``l`` and ``m`` ``[M]``.
    Each row needs a finite score in its first tile: ``m`` is finite from then on, so no
    ``-inf - -inf`` ever reaches ``exp2``.
    """
    m_new = tl.maximum(m, tl.max(s, axis=1))
    alpha = tl.exp2(m - m_new)
    p = tl.exp2(s - m_new[:, None])
    return p, alpha, l * alpha + tl.sum(p, axis=1), m_new
