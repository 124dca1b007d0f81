"""Piecewise graphs (``engine/piecewise.py``): buckets and configuration; on CPU, the static
buffers, padding and per-layer eager attention (``capture=False``) against the eager engine and HF
transformers, for every strategy family; on a GPU, captured pieces against the eager engine."""
from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings, strategies as st

from hf_ref import hf_greedy, make_tiny_checkpoint
from kvscope import LLM, SamplingParams
from kvscope.config import EngineConfig
from kvscope.engine.piecewise import PiecewiseRunner, default_piecewise_sizes, engine_piecewise_sizes
from kvscope.errors import ConfigError

CPU = torch.device("cpu")


def test_default_sizes():
    assert default_piecewise_sizes(8192) == [16, 32, 64, 128, 256, 512, 768, 1024]
    assert default_piecewise_sizes(1024) == [16, 32, 64, 128, 256, 512, 768, 1024]
    assert default_piecewise_sizes(600) == [16, 32, 64, 128, 256, 512, 600]
    assert default_piecewise_sizes(16) == [16]
    assert default_piecewise_sizes(10) == [10]


def test_engine_sizes():
    cuda = torch.device("cuda")
    assert engine_piecewise_sizes(False, CPU, None, 2048) is None
    assert engine_piecewise_sizes(True, cuda, None, 2048) is None
    assert engine_piecewise_sizes(False, cuda, [], 2048) is None
    assert engine_piecewise_sizes(False, cuda, [8, 64], 2048) == [8, 64]
    assert engine_piecewise_sizes(False, cuda, None, 100) == [16, 32, 64, 100]


@pytest.mark.parametrize("sizes, match", [([0, 4], r"piecewise_graph_sizes\[0\]"), ([2.5], "piecewise_graph_sizes"),
                                          ("16", "piecewise_graph_sizes"), ([4096], "max_num_batched_tokens")])
def test_bad_sizes_are_named(sizes, match):
    with pytest.raises(ConfigError, match=match):
        EngineConfig(piecewise_graph_sizes=sizes, max_num_batched_tokens=2048)


def test_empty_sizes_are_allowed():
    assert EngineConfig(piecewise_graph_sizes=[]).piecewise_graph_sizes == []


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 300), min_size=1, max_size=6, unique=True), st.integers(1, 320))
def test_bucket_is_the_smallest_that_holds_the_step(sizes, n):
    runner = PiecewiseRunner.__new__(PiecewiseRunner)
    runner.sizes = sorted(sizes)
    bucket = runner.bucket_for(n)
    holding = [s for s in sizes if s >= n]
    assert bucket == (min(holding) if holding else None)


STRATEGIES = [
    "paged", "contiguous", "h2o:heavy_ratio=0.2,recent_ratio=0.2", "snapkv:budget_ratio=0.3",
    "pyramidkv:budget_ratio=0.3", "streaming:budget_ratio=0.3", "quant:dtype=int8", "quest:budget_ratio=0.5",
    "adaptive:block_size=16,long_threshold=40",
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[str, object]:
    path = tmp_path_factory.mktemp("piecewise") / "llama"
    return str(path), make_tiny_checkpoint("llama", path)


def _prompts(seed: int = 7) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(4, 300) for _ in range(n)] for n in (70, 5, 33, 120, 1, 48)]


def _run(path: str, spec: str, sizes: list[int] | None, prompts: list[list[int]], tokens: int = 12,
         **engine):
    """Greedy outputs with logits; ``sizes``: piecewise buckets run through static buffers."""
    # 64-token chunks: the long prompts are chunked, and the chunks share steps with decode rows.
    llm = LLM(path, strategy=spec, kv_memory_bytes=4 << 20, max_model_len=256, max_num_seqs=4,
              max_num_batched_tokens=64, **engine)
    e = llm.engine
    if sizes is not None:
        e.runner.pieces = PiecewiseRunner(e.model, sizes, e.config.torch_dtype, e.config.torch_device, capture=False)
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True, return_logits=True)
    return llm.generate(prompts, params, use_tqdm=False), e.runner.piecewise_replays


@pytest.mark.parametrize("spec", STRATEGIES)
def test_static_pieces_equal_the_eager_engine(tiny, spec):
    """Every step of up to 48 tokens (a bucket of 8, 16 or 48, padded) runs through the static
    buffers with the strategy's attention over its real rows: the same greedy tokens and logits as
    the eager engine. Steps of 49-64 tokens run eagerly beside them."""
    path, _ = tiny
    prompts = _prompts()
    eager, none = _run(path, spec, None, prompts)
    pieces, replays = _run(path, spec, [8, 16, 48], prompts)
    assert none == 0 and replays > 0
    for a, b in zip(eager, pieces):
        assert a.token_ids == b.token_ids
        torch.testing.assert_close(torch.stack(b.outputs[0].logits), torch.stack(a.outputs[0].logits),
                                   rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("spec", ["paged", "h2o:heavy_ratio=0.2,recent_ratio=0.2"])
def test_static_pieces_take_the_pending_ids_under_async_scheduling(tiny, spec):
    """With async scheduling a mixed step's decode rows carry ids the host does not know yet (the
    step in flight samples them; ``input_patch`` writes them on the device): the pieces read the
    patched ids, so the tokens are the synchronous eager engine's."""
    path, _ = tiny
    prompts = _prompts(11)
    eager, _ = _run(path, spec, None, prompts, async_scheduling=False)
    pieces, replays = _run(path, spec, [8, 16, 48], prompts, async_scheduling=True)
    assert replays > 0
    assert [o.token_ids for o in pieces] == [o.token_ids for o in eager]


def test_static_pieces_equal_hf(tiny):
    """Lossless ``paged`` through the pieces: HF transformers' greedy tokens and logits."""
    path, hf = tiny
    prompts = _prompts(3)
    outs, replays = _run(path, "paged", [16, 64], prompts)
    assert replays > 0
    for prompt, out in zip(prompts, outs):
        tokens, logits = hf_greedy(hf, prompt, 12)
        assert out.token_ids == tokens
        torch.testing.assert_close(torch.stack(out.outputs[0].logits), logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("spec", ["offload", "infinigen:calibration=random,budget_ratio=0.5"])
def test_backends_with_a_layer_input_hook_run_eagerly(tiny, spec):
    """An offloading strategy starts its fetches in ``layer_input``, inside what would be a piece:
    its steps run eagerly, with the same tokens."""
    path, _ = tiny
    prompts = _prompts()[:3]
    eager, _ = _run(path, spec, None, prompts, tokens=6)
    pieces, replays = _run(path, spec, [8, 16, 64], prompts, tokens=6)
    assert replays == 0
    assert [o.token_ids for o in pieces] == [o.token_ids for o in eager]


def test_cpu_engine_builds_no_pieces(tiny):
    llm = LLM(tiny[0], kv_memory_bytes=4 << 20, max_model_len=128)
    llm.generate([[5, 6, 7]], SamplingParams(max_tokens=3, ignore_eos=True), use_tqdm=False)
    stats = llm.engine.stats()
    assert stats["piecewise_graph_replays"] == 0 and stats["piecewise_graph_sizes"] == []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", ["llama", "opt"])
@pytest.mark.parametrize("spec", ["paged", "h2o:heavy_ratio=0.2,recent_ratio=0.2", "quant:dtype=fp8",
                                  "quest:budget_ratio=0.5", "pyramidkv:budget_ratio=0.3"])
def test_captured_pieces_equal_eager_on_cuda(tmp_path, kind, spec):
    """Float32 on a GPU: prefill chunks and mixed steps replayed from captured pieces give the
    eager engine's greedy tokens and logits (and HF's, for ``paged``)."""
    path = tmp_path / kind
    hf = make_tiny_checkpoint(kind, path)
    prompts = _prompts()
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, return_logits=True)
    outs = {}
    for eager in (True, False):
        llm = LLM(str(path), device="cuda", strategy=spec, enforce_eager=eager, kv_memory_bytes=8 << 20,
                  max_model_len=256, max_num_seqs=4, max_num_batched_tokens=64)
        outs[eager] = llm.generate(prompts, params, use_tqdm=False)
        stats = llm.engine.stats()
        assert (stats["piecewise_graph_replays"] == 0) if eager else (stats["piecewise_graph_replays"] > 0), stats
        assert eager or stats["piecewise_graph_sizes"] == [16, 32, 64]
    for a, b in zip(outs[True], outs[False]):
        assert a.token_ids == b.token_ids
        torch.testing.assert_close(torch.stack(b.outputs[0].logits), torch.stack(a.outputs[0].logits),
                                   rtol=1e-3, atol=1e-3)
    if spec == "paged":
        for prompt, out in zip(prompts, outs[False]):
            assert out.token_ids == hf_greedy(hf, prompt, 12)[0]


def test_cli_flag():
    from kvscope.cli import build_parser
    from kvscope.cli_args import _llm_args

    parse = build_parser().parse_args
    assert _llm_args(parse(["serve", "--piecewise-graph-sizes", "16,64"]))["piecewise_graph_sizes"] == [16, 64]
    assert _llm_args(parse(["serve", "--piecewise-graph-sizes", "none"]))["piecewise_graph_sizes"] == []
    assert _llm_args(parse(["generate", "hi"]))["piecewise_graph_sizes"] is None
    for bad in ("16,0", "16,x", ""):
        with pytest.raises(SystemExit):
            parse(["serve", "--piecewise-graph-sizes", bad])


def test_capture_out_of_memory_is_a_config_error_naming_the_fields(monkeypatch):
    """A pool that leaves too little memory for the pieces' activations: the engine refuses to
    start, naming what to change, instead of a bare CUDA out-of-memory error."""
    from kvscope.engine import piecewise

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 58.00 MiB")

    monkeypatch.setattr(piecewise, "PiecewiseRunner", oom)
    with pytest.raises(ConfigError, match=r"piecewise graphs for 64-token steps.*kv_memory_fraction.*piecewise_graph_sizes"):
        piecewise.build_pieces(None, [16, 64], torch.float32, CPU)
    assert piecewise.build_pieces(None, None, torch.float32, CPU) is None
