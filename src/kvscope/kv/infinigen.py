"""``infinigen``: host-resident KV with speculative prefetch of the tokens the next layer will attend
to (InfiniGen, Lee et al., OSDI 2024; the InfiniGen row of the study).

Per layer ``l >= dense_layers`` and decode step, while layer ``l - 1`` computes:

1. **Speculate.** Layer ``l - 1``'s attention input ``x`` goes through layer ``l``'s query
   projection and RoPE (InfiniGen's Llama code: the whole next-layer query, then the skew), is
   skewed (``q A``, see ``kv/skew.py``) and cut to the partial columns. Its dot products with the
   *partial key cache* (the same columns of every cached key, skewed, resident on the device) give
   approximate attention logits ``[B, Hq, T]``.
2. **Select.** Per query head, tokens whose logit exceeds the head's max minus ``alpha``. Per
   request, ``k`` is the mean count over its heads, capped by ``max_num_kv`` and by ``budget_ratio``
   of its own context; each of its KV heads then takes its top ``k`` tokens. (InfiniGen averages
   over a batch of equal-length prompts, where the two agree; in a continuous batch a batch-wide
   ``k`` would size a long prompt's selection by its short neighbours.) Grouped-query attention: a KV
   head's score of a token is the best over its group's query heads (InfiniGen, written for MHA,
   selects per head; a KV head is fetched for all its query heads at once).
3. **Prefetch** those rows (one token of one KV head each) from pinned host memory on the copy
   stream, with the device-side gather.

Layer ``l`` then attends over the fetched rows plus the new token (always included; no recent
window, as in InfiniGen). Layers below ``dense_layers`` (InfiniGen: 2) and prefill chunks fetch
the whole KV like ``offload``. Each selection bumps the host pool's per-token counter; with
``pool_eviction`` a full pool replaces the least-selected old token instead of preempting.

``lossless`` is False: with ``alpha`` large and no cap every token is selected and the outputs
equal ``paged``'s (tested).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from kvscope.attention.triton_speculate import speculate_rows
from kvscope.constants import DEFAULT_BUDGET_RATIO
from kvscope.device_copy import to_device
from kvscope.errors import ConfigError
from kvscope.kv.base import KVSetup, KVUsage, StepBatch
from kvscope.kv.infinigen_decode import InfiniGenDecode
from kvscope.kv.offload_base import HostOffloadStrategy, OffloadAttention, _Staged
from kvscope.kv.registry import register
from kvscope.kv.skew import CALIBRATION_TOKENS, calibration_tokens, load_or_compute_skew
from kvscope.kv.slot_cache import SlotAttention


class InfiniGenAttention(OffloadAttention):
    """One step of :class:`InfiniGenStrategy`: dense fetch below ``dense_layers`` and for prefill
    chunks, speculative per-head fetch for decode rows above."""

    def __init__(self, strategy: "InfiniGenStrategy", batch: StepBatch, prev: list[torch.Tensor],
                 new_slots: torch.Tensor) -> None:
        self.g = strategy
        qs = batch.query_start
        n = batch.num_new_tokens
        self.spec = [i for i in range(len(prev)) if n[i] == 1 and prev[i].numel() > 0]
        spec = set(self.spec)
        self.full = [i for i in range(len(prev)) if i not in spec]
        super().__init__(strategy, batch, prev, new_slots)
        if not self.spec:
            return
        device = new_slots.device
        hkv = strategy.setup.model.num_kv_heads
        heads = torch.arange(hkv, device=device)
        full_prev = torch.cat([prev[i] for i in self.full]) if self.full else new_slots[:0]
        self.num_full = full_prev.numel()
        self.per_head = strategy.select == "head"
        # Rows of the speculative layers' fetch: one token of one KV head, or a whole token.
        self.full_rows = (full_prev[:, None] * hkv + heads).flatten() if self.per_head else full_prev
        lens = [prev[i].numel() for i in self.spec]
        width = max(lens)
        padded = torch.zeros(len(lens), width, dtype=torch.long, device=device)
        for j, i in enumerate(self.spec):
            padded[j, : lens[j]] = prev[i]
        self.spec_slots = padded  # [B, Tmax]
        self.spec_lens = to_device(lens, device, torch.long)
        self.spec_real = torch.ones(len(lens), dtype=torch.bool, device=device)
        self.num_candidates = sum(lens)
        caps = [strategy.k_cap(n) for n in lens]
        self.k_cap = int(max(caps))  # the selection is laid out [B, H, k_cap] for the largest row's cap
        self.cap = to_device(caps, device, torch.float32)
        # Only each row's own cap of that layout can hold kept tokens, and only those are fetched:
        # padded to the largest cap, a batch of many short rows beside a long one would ask for more
        # rows than the prefetch buffer holds (it holds every held token once). ``ragged`` picks
        # them out of the layout; ``unragged`` puts them back (places past a row's cap read row 0,
        # masked out in ``attend``).
        h = hkv if self.per_head else 1
        slot_ok = torch.arange(self.k_cap)[None, None, :] < torch.tensor(caps)[:, None, None]
        flat = slot_ok.expand(-1, h, -1).flatten()
        ragged = flat.nonzero().flatten()
        unragged = torch.zeros(flat.numel(), dtype=torch.long)
        unragged[ragged] = torch.arange(ragged.numel())
        self.ragged, self.unragged = to_device(ragged, device), to_device(unragged, device)
        self.spec_q = to_device([qs[i] for i in self.spec], device, torch.long)
        self.spec_positions = batch.positions[self.spec_q]
        # Staged layout of speculative layers: the full rows' fetched tokens, then all new tokens;
        # a decode row's table holds only its new token (its real attention is computed apart).
        m, tables, off = self.num_full, [], 0
        for i in range(len(prev)):
            new = torch.arange(m + qs[i], m + qs[i + 1], device=device)
            if i in spec:
                tables.append(new)
            else:
                c = prev[i].numel()
                tables.append(torch.cat((torch.arange(off, off + c, device=device), new)))
                off += c
        self.partial_dense = SlotAttention(_Staged(new_slots.new_empty(0)), new_slots, tables, qs, strategy.scale)
        self.selected: dict[int, torch.Tensor] = {}

    def speculative(self, layer: int) -> bool:
        return layer >= self.g.dense_layers and bool(self.spec)

    def layer_input(self, layer: int, x: torch.Tensor) -> None:
        nxt = layer + 1
        if nxt >= self.g.num_layers:
            return
        if not self.speculative(nxt):
            self.start_fetch(nxt)
            return
        rows, valid = self.speculate(nxt, x[self.spec_q])
        host = self.g.pool.layer_rows(nxt, per_head=self.per_head)
        valid = torch.cat((valid.new_ones(self.full_rows.numel()), valid))
        self.fetches[nxt] = self.g.transfer.fetch(host, torch.cat((self.full_rows, rows)), slot=nxt, valid=valid)

    def speculate(self, layer: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Select layer ``layer``'s tokens for the decode rows from their attention input ``x``
        ``[B, hidden]`` (of the previous layer); returns host rows ``[R]`` and which of them are
        selected (``[R]`` bool): each row's first ``cap_i`` places per head of the ``[B, H, k_cap]``
        selection, ``R = H x sum(cap_i)``, ``H`` = ``Hkv`` (per head) or 1."""
        g = self.g
        rows, valid, _ = g.select_rows(layer, x, self.spec_positions, self.spec_slots, self.spec_lens,
                                       self.spec_real, self.cap, self.k_cap)
        g.candidate_tokens[layer] += self.num_candidates
        self.selected[layer] = valid
        return rows.flatten()[self.ragged], valid.flatten()[self.ragged]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        g = self.g
        g.write_partial_keys(layer, self.new_slots, k)
        if not self.speculative(layer):
            return super().attend(layer, q, k, v)
        # Full rows' tokens then the selected ones, each token's heads together or apart.
        fetched = g.transfer.wait(self.fetches.pop(layer)).reshape(2, -1)
        self.store(layer, k, v)
        hkv, d = k.shape[1], k.shape[2]
        m = self.num_full
        staged = torch.empty(1, 2, m + k.shape[0], hkv, d, dtype=k.dtype, device=k.device)
        staged[0, :, :m] = fetched[:, : m * hkv * d].view(2, m, hkv, d)
        staged[0, 0, m:] = k
        staged[0, 1, m:] = v
        self.partial_dense.cache = _Staged(staged)
        out = self.partial_dense.attend_cached(0, q)
        valid = self.selected.pop(layer)  # [B, Hkv or 1, k]
        b, kk = valid.shape[0], valid.shape[2]
        width = d if self.per_head else hkv * d
        sel = fetched[:, m * hkv * d : m * hkv * d + self.ragged.numel() * width].view(2, -1, width)
        sel = sel[:, self.unragged]  # the [B, H, k] layout
        sel = sel.view(2, b, hkv, kk, d) if self.per_head else sel.view(2, b, kk, hkv, d).transpose(2, 3)
        valid = valid.expand(-1, hkv, -1)
        # Rows not selected were never copied (nor are places past a row's cap): whatever they hold,
        # NaN included, must not reach the attention, where a masked NaN value still poisons the sum.
        sel = sel.masked_fill(~valid[None, :, :, :, None], 0)
        keys = torch.cat((sel[0], k[self.spec_q][:, :, None]), dim=2)  # [B, Hkv, k + 1, D]
        vals = torch.cat((sel[1], v[self.spec_q][:, :, None]), dim=2)
        mask = torch.cat((valid, valid.new_ones(b, hkv, 1)), dim=2)
        group = q.shape[1] // hkv
        mask = mask.repeat_interleave(group, dim=1)[:, :, None, :]  # [B, Hq, 1, k + 1]
        o = F.scaled_dot_product_attention(
            q[self.spec_q][:, :, None], keys, vals, attn_mask=mask, scale=self.s.scale, enable_gqa=group > 1
        )
        out[self.spec_q] = o[:, :, 0]
        return out


@register
class InfiniGenStrategy(HostOffloadStrategy):
    """InfiniGen. Args: ``alpha`` (4), ``partial_weight_ratio`` (0.2), ``budget_ratio`` (0.2; None:
    uncapped), ``max_num_kv`` (None), ``dense_layers`` (2), ``calibration`` (prose source or
    ``"random"``), ``calibration_len`` (2048 tokens, as InfiniGen), ``pool_eviction`` (True), ``select`` (``"head"``: each KV head its own top-k,
    as InfiniGen; ``"token"``: top-k tokens by their best head, fetched whole: ``Hkv`` times larger
    rows, measured no faster once the gather sorts its rows, and worse on RULER), plus ``offload``'s
    ``host_kv_bytes``, ``block_size``, ``overlap``."""

    name = "infinigen"
    lossless = False
    attention_class = InfiniGenAttention
    decode_class = InfiniGenDecode

    def __init__(
        self,
        alpha: float = 4.0,
        partial_weight_ratio: float = 0.2,
        budget_ratio: float | None = DEFAULT_BUDGET_RATIO,
        max_num_kv: int | None = None,
        dense_layers: int = 2,
        calibration: str = "britannica",
        calibration_len: int = CALIBRATION_TOKENS,
        pool_eviction: bool = True,
        select: str = "head",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if select not in ("head", "token"):
            raise ConfigError(f"infinigen: select must be 'head' or 'token', got {select!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
            raise ConfigError(f"infinigen: alpha must be > 0, got {alpha!r}")
        for key, val in (("partial_weight_ratio", partial_weight_ratio), ("budget_ratio", budget_ratio)):
            if val is not None and not (isinstance(val, (int, float)) and 0.0 < val <= 1.0):
                raise ConfigError(f"infinigen: {key} must be in (0, 1], got {val!r}")
        if partial_weight_ratio is None:
            raise ConfigError("infinigen: partial_weight_ratio must be in (0, 1], got None")
        if max_num_kv is not None and (not isinstance(max_num_kv, int) or max_num_kv < 1):
            raise ConfigError(f"infinigen: max_num_kv must be an integer >= 1, got {max_num_kv!r}")
        if not isinstance(calibration_len, int) or calibration_len < 16:
            raise ConfigError(f"infinigen: calibration_len must be an integer >= 16, got {calibration_len!r}")
        if not isinstance(dense_layers, int) or dense_layers < 1:
            # Layer 0 has no previous layer to speculate from.
            raise ConfigError(f"infinigen: dense_layers must be an integer >= 1, got {dense_layers!r}")
        self.alpha = float(alpha)
        self.partial_weight_ratio = float(partial_weight_ratio)
        self.budget_ratio = budget_ratio
        self.max_num_kv = max_num_kv
        self.dense_layers = dense_layers
        self.calibration = calibration
        self.calibration_len = calibration_len
        self.evicts_on_full = bool(pool_eviction)
        self.select = select

    def kept_share(self, prompt_tokens: int | None = None) -> float | None:
        """The share of the context fetched per step (all KV stays on the host); None uncapped."""
        return self.budget_ratio

    @classmethod
    def args_for_share(cls, share: float) -> dict[str, Any] | None:
        return {"budget_ratio": share}

    def _partial_dim(self, head_dim: int) -> int:
        return max(1, int(self.partial_weight_ratio * head_dim))

    def resident_bytes_per_token(self, setup: KVSetup) -> int:
        """The partial key cache: ``d'`` skewed columns of every layer's keys."""
        m = setup.model
        elem = torch.empty(0, dtype=setup.dtype).element_size()
        return m.num_layers * m.num_kv_heads * self._partial_dim(m.head_dim) * elem

    def bind(self, setup: KVSetup) -> None:
        super().bind(setup)
        m = setup.model
        self.partial_keys = torch.zeros(
            m.num_layers, self.pool.num_slots + 1, m.num_kv_heads, self._partial_dim(m.head_dim),
            dtype=setup.dtype, device=setup.device,
        )
        self.selected_tokens = torch.zeros(m.num_layers, m.num_kv_heads, dtype=torch.float64, device=setup.device)
        self._counted: tuple[torch.Tensor, torch.Tensor] | None = None  # slots, their counters at begin_step
        self.candidate_tokens = torch.zeros(m.num_layers, dtype=torch.float64)
        # Static decode steps speculate on a stream of their own (see InfiniGenDecode.layer_input).
        self.spec_stream = torch.cuda.Stream(setup.device) if self.transfer.overlap else None

    def attach_model(self, loaded) -> None:
        self.model = loaded.model
        length = min(self.calibration_len, loaded.config.max_position_embeddings)
        tokens = calibration_tokens(loaded.tokenizer, loaded.config.vocab_size, self.calibration, length)
        skew, _ = load_or_compute_skew(loaded.model, tokens, self.setup.device)
        _, sub = skew.partial(self.partial_weight_ratio)
        self.skew_sub = sub.to(self.setup.device)  # [L, Hkv, D, d'] float32

    def k_cap(self, context: int) -> float:
        """The most tokens a KV head of a request with ``context`` earlier tokens keeps:
        ``budget_ratio`` of them (at least 1) and at most ``max_num_kv``."""
        cap = float(context)
        if self.max_num_kv is not None:
            cap = min(cap, self.max_num_kv)
        if self.budget_ratio is not None:
            cap = min(cap, max(1, int(self.budget_ratio * context)))
        return cap

    def select_rows(self, layer: int, x: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                    lens: torch.Tensor, real: torch.Tensor, cap: torch.Tensor, kp: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Speculate layer ``layer``'s rows for ``B`` decode rows from their previous layer's
        attention input ``x`` ``[B, hidden]`` at ``positions`` ``[B]``; ``slots`` ``[B, C]``,
        ``lens``, ``real``, ``cap`` and ``kp`` as :func:`~kvscope.attention.triton_speculate.speculate_rows`
        takes them, whose rows ``[B, H, kp]``, validity and kept counts ``[B, H]`` this returns.
        ``k`` is decided on the device: reading it on the host would stall the CPU once per layer;
        rows past it are masked out (the gather skips them, attention ignores them). Under tensor
        parallelism ``k`` (a mean over the request's heads) is reduced over the group's heads."""
        hkv = self.setup.model.num_kv_heads
        q = self.model.attention_query(layer, x, positions)  # [B, Hq, D]
        q = q.view(x.shape[0], hkv, -1, q.shape[-1]).float()
        qp = torch.einsum("bhgd,hdc->bhgc", q, self.skew_sub[layer])
        tp = self.setup.tensor_parallel  # k and a token's best head are over every rank's heads
        rows, valid, kept = speculate_rows(
            qp, self.partial_keys[layer], slots, lens, real, self.scale, self.alpha, cap, self.select == "head", kp,
            self.pool.counters, use_triton=self.setup.attention_backend == "triton" and x.is_cuda,
            all_reduce=None if tp is None else tp.all_reduce, world=1 if tp is None else tp.size,
        )
        self.selected_tokens[layer] += kept.sum(0)
        return rows, valid, kept

    def write_partial_keys(self, layer: int, slots: torch.Tensor, k: torch.Tensor) -> None:
        """Store the skewed partial columns of new keys ``k`` ``[N, Hkv, D]`` at host ``slots`` ``[N]``
        (speculative layers only)."""
        if layer >= self.dense_layers:
            self.partial_keys[layer].index_copy_(
                0, slots, torch.einsum("nhd,hdc->nhc", k.float(), self.skew_sub[layer]).to(k.dtype)
            )

    def adopted(self, slots: torch.Tensor, kv: torch.Tensor) -> None:
        """The partial keys of adopted tokens: their keys ``kv[:, 0]`` ``[L, n, Hkv, D]``, skewed."""
        keys = kv[:, 0].to(self.partial_keys.device).float()
        skewed = torch.einsum("lnhd,lhdc->lnhc", keys, self.skew_sub).to(self.partial_keys.dtype)
        self.partial_keys[:, slots] = skewed

    def begin_step(self, batch: StepBatch) -> InfiniGenAttention | InfiniGenDecode:
        prev, new = self.step_slots(batch)
        tp = self.setup.tensor_parallel
        if tp is not None and self.select == "head" and prev:
            # A rank counts only its own heads' selections; end_step adds the other ranks', so that
            # pool eviction (in allocate, scheduler side: no collective there) picks one rank's victim.
            slots = torch.cat(prev).unique()
            self._counted = (slots, self.pool.counters[slots].clone())
        return self.step_attention(batch, prev, new)

    def end_step(self, batch: StepBatch) -> None:
        super().end_step(batch)
        tp = self.setup.tensor_parallel
        if self._counted is not None and tp is not None:
            slots, before = self._counted
            mine = self.pool.counters[slots] - before  # [n] this rank's selections of the step's tokens
            self.pool.counters[slots] = before + tp.all_reduce(mine, "sum")
            self._counted = None

    def usage(self) -> KVUsage:
        # The partial keys are the only device KV between steps; no counter tensor is read here.
        m = self.setup.model
        elem = self.partial_keys.element_size()
        used = self.pool.used_tokens * m.num_layers * m.num_kv_heads * self.partial_keys.shape[-1] * elem
        return KVUsage(used, self.transfer.nbytes + self.partial_keys.numel() * elem, self.host_kv_bytes_used())

    def stats(self) -> dict[str, Any]:
        m = self.setup.model
        partial_used = self.pool.used_tokens * m.num_layers * m.num_kv_heads * self.partial_keys.shape[-1]
        elem = self.partial_keys.element_size()
        per_layer = self.selected_tokens.sum(1).cpu() / m.num_kv_heads
        frac = torch.where(self.candidate_tokens > 0, per_layer / self.candidate_tokens.clamp(min=1), 0.0)
        frac[: self.dense_layers] = 1.0  # dense layers fetch every token
        return {
            **super().stats(),
            "kv_bytes_reserved": self.transfer.nbytes + self.partial_keys.numel() * elem,
            "kv_bytes_allocated": self.transfer.nbytes + self.partial_keys.numel() * elem,
            "kv_bytes_used": partial_used * elem,
            "selected_tokens_per_layer_head": self.selected_tokens.cpu().tolist(),
            "selected_fraction_per_layer": frac.tolist(),
        }
