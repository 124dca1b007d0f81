"""HF transformers beside kvscope in ``end_to_end.py``: a ``LlamaForCausalLM`` on kvscope's own
weight tensors (no copy), and the check that both give the same greedy tokens and first logits."""
from __future__ import annotations

import gc

import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

from kvscope.engine.sampling_params import SamplingParams
from kvscope.llm import LLM
from kvscope.models.dummy import PRESETS
from kvscope.models.fused import checkpoint_tensors
from kvscope.models.loader import LoadedModel, load_model


def hf_sharing_weights(loaded: LoadedModel, preset: str, device: torch.device):
    """HF ``LlamaForCausalLM`` of ``preset`` whose parameters are kvscope's tensors (no copy)."""
    d = {k: v for k, v in PRESETS[preset].items() if k != "model_type"}
    cfg = LlamaConfig.from_dict(d | {"bos_token_id": None, "eos_token_id": None, "pad_token_id": 0})
    cfg._attn_implementation = "sdpa"
    with torch.device("meta"):
        hf = LlamaForCausalLM(cfg)
    state = checkpoint_tensors(loaded.model)  # HF names; fused q/k/v and gate/up as views of their rows
    if cfg.tie_word_embeddings:  # kvscope keeps one tensor; HF names it twice
        state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])
    hf.load_state_dict(state, strict=True, assign=True)
    with torch.device(device):  # the rotary buffers were made on the meta device
        hf.model.rotary_emb = type(hf.model.rotary_emb)(config=cfg)
    left = [n for n, t in [*hf.named_parameters(), *hf.named_buffers()] if t.is_meta]
    if left:
        raise SystemExit(f"HF model tensors left on the meta device: {left}")
    return hf.eval().requires_grad_(False)


def check_agreement(llm: LLM, hf, vocab: int, device: torch.device, steps: int = 16) -> dict:
    prompt = torch.randint(0, vocab, (64,), generator=torch.Generator().manual_seed(12345)).tolist()
    out = llm.generate([prompt], SamplingParams(max_tokens=steps, temperature=0.0, ignore_eos=True,
                                                return_logits=True), use_tqdm=False)[0].outputs[0]
    ids = torch.tensor([prompt], device=device)
    with torch.inference_mode():
        ref0 = hf(ids).logits[0, -1].float().cpu()
        g = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=GenerationConfig(
            max_new_tokens=steps, do_sample=False, pad_token_id=0, return_dict_in_generate=True, output_logits=True))
    ht = g.sequences[0, len(prompt):].tolist()
    kt = out.token_ids
    agree = next((i for i, (a, b) in enumerate(zip(kt, ht)) if a != b), steps)
    diff0 = out.logits[0] - ref0
    res = {"prompt_len": len(prompt), "steps": steps, "agree": agree,
           "first_max_abs_diff": float(diff0.abs().max()), "first_max_abs_logit": float(ref0.abs().max()),
           "first_rel_l2": float(diff0.norm() / ref0.norm()), "kvscope_tokens": kt, "hf_tokens": ht}
    ok = res["first_rel_l2"] <= 1e-3
    if agree < steps:
        hl = g.logits[agree][0].float().cpu()
        top2 = hl.topk(2).values
        res["gap_at_divergence"] = float(top2[0] - top2[1])
        res["diff_at_divergence"] = float((out.logits[agree] - hl).abs().max())
        res["near_tie"] = res["gap_at_divergence"] <= 2 * res["diff_at_divergence"]
        ok &= res["near_tie"]
    res["passed"] = bool(ok)
    return res


def check_agreement_fp32(preset: str, device: torch.device) -> dict:
    """:func:`check_agreement` on ``preset`` in float32, with its own weights (freed afterwards)."""
    loaded = load_model(f"dummy:{preset}", device=device, dtype=torch.float32)
    hf = hf_sharing_weights(loaded, preset, device)
    llm = LLM(f"dummy:{preset}", "paged", device=str(device), dtype="float32", loaded_model=loaded,
              kv_memory_bytes=256 << 20, max_model_len=256, enforce_eager=False)
    res = check_agreement(llm, hf, loaded.config.vocab_size, device) | {"model": f"dummy:{preset}", "dtype": "float32"}
    del llm, hf, loaded
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return res
