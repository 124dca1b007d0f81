"""SmolLM2-135M (real weights): contiguous and paged match HF transformers token for token, one
request at a time and as one batch of mixed lengths, with per-step logits within 1e-3."""
from __future__ import annotations

import pytest
import torch

from hf_ref import hf_greedy
from kvscope import LLM, SamplingParams

pytestmark = pytest.mark.slow
NEW = 64
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "Water boils at",
    "Translate to French: I would like a cup of coffee.",
    "The three primary colors are",
    "In 1969, the first humans landed on the Moon. The mission was called",
]


@pytest.fixture(scope="module")
def reference(smollm2):
    """HF's own model, loaded by transformers from the converted checkpoint folder."""
    from transformers import AutoModelForCausalLM

    from kvscope.models.gguf_convert import converted_gguf
    from kvscope.models.registry import PACKAGED

    folder = converted_gguf(PACKAGED["smollm2-135m"].locate(), "smollm2-135m")
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok = smollm2.tokenizer
    chat = tok.apply_chat_template([{"role": "user", "content": "Name two planets."}])
    prompts = [tok.encode(p) for p in PROMPTS] + [chat]
    return prompts, [hf_greedy(hf, p, NEW) for p in prompts]


@pytest.mark.parametrize("strategy", ["paged", "contiguous"])
def test_smollm2_matches_hf(reference, strategy):
    prompts, refs = reference
    llm = LLM("smollm2-135m", strategy=strategy, kv_memory_bytes=512 << 20, max_model_len=1024)
    sp = SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True, return_logits=True)
    single = [llm.generate([p], sp, use_tqdm=False)[0] for p in prompts]
    batched = llm.generate(prompts, sp, use_tqdm=False)
    for outs in (single, batched):
        for out, (tokens, logits) in zip(outs, refs):
            assert out.token_ids == tokens
            diff = (torch.stack(out.outputs[0].logits) - logits).abs().max().item()
            assert diff < 1e-3, diff


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_smollm2_preemption_keeps_outputs(reference, mode):
    prompts, refs = reference
    llm = LLM("smollm2-135m", kv_memory_bytes=512 << 20)
    bpt = llm.engine.kv.bytes_per_token
    tight = LLM("smollm2-135m", kv_memory_bytes=24 * 16 * bpt, preemption_mode=mode)
    sp = SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True)
    outs = tight.generate(prompts, sp, use_tqdm=False)
    assert tight.engine.stats()["num_preemptions"] > 0
    assert [o.token_ids for o in outs] == [t for t, _ in refs]


def test_smollm2_chat_and_stop_string(smollm2):
    llm = LLM("smollm2-135m", kv_memory_bytes=256 << 20)
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(max_tokens=32, temperature=0.0), use_tqdm=False)[0]
    assert "Paris" in out.text and out.finish_reason == "stop"  # ends with <|im_end|>
    cut = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(max_tokens=32, temperature=0.0, stop=["Paris"]), use_tqdm=False)[0]
    assert "Paris" not in cut.text and out.text.startswith(cut.text)
