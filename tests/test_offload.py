"""``offload`` and ``infinigen``: lossless cases against HF, exact transfer accounting, selection
counts, the host pool's counter eviction, skewing, and bad parameters.

On CPU host and device are the same memory and the transfer engine runs synchronously; the same
code paths (selection, gather through the torch reference, accounting) run. With
``KVSCOPE_TEST_DEVICE=cuda`` the engine tests run on the GPU, and the overlapped copy stream is
compared with the synchronous mode.
"""
from __future__ import annotations

import os
import random

import pytest
import torch

from hf_ref import hf_greedy, make_tiny_checkpoint
from kvscope import LLM, SamplingParams
from kvscope.errors import ConfigError, RequestError
from kvscope.kv.host_pool import HostKVPool
from kvscope.kv.skew import compute_skew
from kvscope.models.dummy import preset_config
from kvscope.models.loader import load_model

DEVICE = os.environ.get("KVSCOPE_TEST_DEVICE", "cpu")
NEW = 16
LOSSLESS_INFINIGEN = "infinigen:alpha=1e9,budget_ratio=None,calibration=random,dense_layers=1"


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KVSCOPE_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module", params=["llama", "opt"])
def tiny(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    hf = make_tiny_checkpoint(request.param, path)
    rng = random.Random(3)
    prompts = [[rng.randrange(4, 256) for _ in range(n)] for n in (5, 40, 1, 23)]
    return str(path), prompts, [hf_greedy(hf, p, NEW) for p in prompts]


def greedy(n: int = NEW) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, return_logits=True)


def assert_matches(outs, refs):
    for out, (tokens, logits) in zip(outs, refs):
        assert out.token_ids == tokens
        ours = torch.stack(out.outputs[0].logits)
        assert torch.allclose(ours, logits, atol=1e-3, rtol=0), (ours - logits).abs().max()


def test_offload_equals_hf_batched_chunked_and_preempted(tiny):
    path, prompts, refs = tiny
    llm = LLM(path, device=DEVICE, strategy="offload", kv_memory_bytes=8 << 20, max_model_len=256)
    assert_matches(llm.generate(prompts, greedy(), use_tqdm=False), refs)
    # 7-token chunks: prefill chunks attend over fetched earlier chunks plus themselves, causally.
    # A host pool of 64 tokens cannot hold all four requests: the scheduler preempts.
    bpt = llm.engine.kv.bytes_per_token
    llm = LLM(path, device=DEVICE, strategy=f"offload:host_kv_bytes={64 * bpt},block_size=4",
              kv_memory_bytes=8 << 20, max_model_len=64, max_num_batched_tokens=7)
    assert_matches(llm.generate(prompts, greedy(), use_tqdm=False), refs)
    assert llm.engine.stats()["num_preemptions"] > 0


@pytest.mark.parametrize("select", ["head", "token"])
def test_infinigen_selecting_everything_equals_hf(tiny, select):
    path, prompts, refs = tiny
    llm = LLM(path, device=DEVICE, strategy=f"{LOSSLESS_INFINIGEN},select={select}", kv_memory_bytes=8 << 20,
              max_model_len=256)
    for p, ref in zip(prompts, refs):  # one at a time here; batched in a tight buffer below
        assert_matches(llm.generate([p], greedy(), use_tqdm=False), [ref])
    frac = llm.engine.stats()["selected_fraction_per_layer"]
    assert frac == [1.0] * len(frac)


@pytest.mark.parametrize("select", ["head", "token"])
def test_infinigen_batched_unequal_contexts_in_a_tight_buffer_equals_hf(tiny, select):
    """Lossless InfiniGen, batched, with 7-token prefill chunks beside decode rows of unequal
    contexts, in a prefetch buffer of 144 tokens (the four requests hold at most 133): each decode
    row's selection is fetched up to its own cap, so the step fits (laid out for the longest row's
    cap, 4 rows would have asked for over 200), and every token and logit equals HF's."""
    path, prompts, refs = tiny
    spec = f"{LOSSLESS_INFINIGEN},select={select}"
    probe = LLM(path, device=DEVICE, strategy=spec, kv_memory_bytes=8 << 20, max_model_len=64)
    per_token = probe.engine.kv.min_device_bytes(probe.engine.kv.setup) // 64
    llm = LLM(path, device=DEVICE, strategy=spec, kv_memory_bytes=144 * per_token, max_model_len=64,
              max_num_batched_tokens=7)
    assert llm.engine.kv.buffer_tokens == 144
    assert_matches(llm.generate(prompts, greedy(), use_tqdm=False), refs)
    assert llm.engine.stats()["num_preemptions"] == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the copy stream exists only on CUDA")
@pytest.mark.parametrize("strategy", ["offload", "infinigen:calibration=random"])
def test_overlapped_equals_synchronous(tiny, strategy):
    path, prompts, _ = tiny
    outs = []
    for overlap in (True, False):
        llm = LLM(path, device="cuda", strategy=f"{strategy},overlap={overlap}".replace("offload,", "offload:"),
                  kv_memory_bytes=8 << 20, max_model_len=256)
        outs.append([o.outputs[0].logits for o in llm.generate(prompts, greedy(), use_tqdm=False)])
    for a, b in zip(*outs):
        assert torch.equal(torch.stack(a), torch.stack(b))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("spec", ["infinigen:calibration=random,alpha=2,dense_layers=1,select=head",
                                  "infinigen:calibration=random,alpha=2,dense_layers=1,select=token", "offload"])
def test_host_graphs_equal_eager(tiny, spec):
    """Decode steps replayed from captured graphs (padded batch and context buckets) give the eager
    steps' tokens, logits, transfer bytes and (infinigen) selection counts; a lossless strategy's
    (offload) both equal HF's."""
    path, prompts, refs = tiny
    runs = {}
    for eager in (True, False):
        llm = LLM(path, device="cuda", strategy=spec, enforce_eager=eager, kv_memory_bytes=8 << 20, max_model_len=256)
        outs = llm.generate(prompts, greedy(), use_tqdm=False)
        st = llm.engine.stats()
        assert (st["cuda_graph_replays"] == 0) == eager, st["cuda_graph_replays"]
        if llm.engine.kv.lossless:
            assert_matches(outs, refs)
        runs[eager] = (outs, st)
    (eager_outs, eager_st), (graph_outs, graph_st) = runs[True], runs[False]
    assert [o.token_ids for o in graph_outs] == [o.token_ids for o in eager_outs]
    for a, b in zip(graph_outs, eager_outs):
        x, y = torch.stack(a.outputs[0].logits), torch.stack(b.outputs[0].logits)
        assert torch.allclose(x, y, atol=1e-4, rtol=0), (x - y).abs().max()
    for key in ("transfer_bytes_h2d", "transfer_bytes_d2h", "selected_tokens_per_layer_head"):
        assert graph_st.get(key) == eager_st.get(key), key


def test_offload_transfer_bytes_are_exact():
    """One request, prompt P, G tokens: decode step j fetches the P + j - 1 earlier tokens of every
    layer; every computed token is written back once."""
    llm = LLM("dummy:tiny-llama", strategy="offload", kv_memory_bytes=8 << 20, max_model_len=128)
    p, g = 20, 6
    llm.generate([[5] * p], SamplingParams(max_tokens=g, ignore_eos=True), use_tqdm=False)
    cfg = llm.engine.model_config
    per_token_layer = 2 * cfg.num_kv_heads * cfg.head_dim * 4  # K and V, float32
    fetched = sum(p + j - 1 for j in range(1, g))
    st = llm.engine.stats()
    assert st["transfer_bytes_h2d"] == cfg.num_layers * fetched * per_token_layer
    assert st["transfer_bytes_d2h"] == cfg.num_layers * (p + g - 1) * per_token_layer
    assert st["host_kv_bytes"] == 0 and st["host_blocks_used"] == 0


@pytest.mark.parametrize("select", ["head", "token"])
def test_infinigen_selection_counts_follow_the_budget(select):
    """alpha = inf selects every token, so k is the budget cap: int(ratio * context) per head (or
    per token, fetched for every head: the same rows and bytes)."""
    ratio, p, g = 0.5, 30, 5
    spec = f"infinigen:alpha=1e9,budget_ratio={ratio},calibration=random,dense_layers=1,select={select}"
    llm = LLM("dummy:tiny-llama", strategy=spec,
              kv_memory_bytes=8 << 20, max_model_len=128)
    llm.generate([[7] * p], SamplingParams(max_tokens=g, ignore_eos=True), use_tqdm=False)
    cfg = llm.engine.model_config
    st = llm.engine.stats()
    ks = [int(ratio * (p + j - 1)) for j in range(1, g)]
    per_head = st["selected_tokens_per_layer_head"]
    for layer in range(cfg.num_layers):
        expect = sum(ks) if layer >= 1 else 0
        assert per_head[layer] == [expect] * cfg.num_kv_heads
    # Fetched bytes: dense layers take everything, speculative ones k rows per KV head.
    row = cfg.head_dim * 4 * 2
    dense = sum(p + j - 1 for j in range(1, g)) * cfg.num_kv_heads * row
    spec = (cfg.num_layers - 1) * sum(ks) * cfg.num_kv_heads * row
    assert st["transfer_bytes_h2d"] == dense + spec


def test_host_pool_counter_eviction_picks_least_selected_old_token():
    cfg = preset_config("tiny-llama")
    pool = HostKVPool(cfg, 16 * cfg.kv_bytes_per_token(torch.float32), torch.float32, False, 4, torch.device("cpu"))
    slots = pool.append("r", 16, 0)
    assert slots.tolist() == list(range(16)) and not pool.can_append("r", 1)
    pool.counters[slots] = torch.tensor([5, 1, 7, 0, 9, 9, 9, 9, 0, 0, 0, 0, 0, 0, 0, 0], dtype=torch.int32)
    # Older half of position 16 is positions 0..7: slot 3 has the fewest selections there.
    assert pool.replace_least_selected("r", 16).tolist() == [3]
    assert pool.positions[3] == 16 and pool.counters[3] == 0
    assert pool.replace_least_selected("r", 17).tolist() == [1]
    assert pool.held("r") == 16 and pool.evicted_tokens == 2
    pool.free("r")
    assert pool.pool.num_free == 4


def test_skewing_preserves_scores():
    loaded = load_model("dummy:tiny-llama", seed=0)
    cfg = loaded.config
    skew = compute_skew(loaded.model, list(range(1, 60)), torch.device("cpu"))
    a = skew.matrix  # [L, Hkv, D, D]
    eye = torch.eye(cfg.head_dim).expand_as(a)
    assert torch.allclose(a.transpose(-1, -2) @ a, eye, atol=1e-5)
    q, k = torch.randn(2, 10, cfg.head_dim), torch.randn(2, 12, cfg.head_dim)
    for layer in range(cfg.num_layers):
        for h in range(cfg.num_kv_heads):
            m = a[layer, h]
            assert torch.allclose((q @ m) @ (k @ m).transpose(-1, -2), q @ k.transpose(-1, -2), atol=1e-4)
    # Energy is sorted by construction of the SVD: the first column carries the most.
    assert (skew.energy[..., 0] >= skew.energy[..., -1]).all()


@pytest.mark.parametrize(
    "spec, message",
    [
        ("infinigen:alpha=0", "alpha must be > 0"),
        ("infinigen:alpha=-1", "alpha must be > 0"),
        ("infinigen:partial_weight_ratio=0", "partial_weight_ratio must be in (0, 1]"),
        ("infinigen:partial_weight_ratio=1.5", "partial_weight_ratio must be in (0, 1]"),
        ("infinigen:budget_ratio=2", "budget_ratio must be in (0, 1]"),
        ("infinigen:max_num_kv=0", "max_num_kv must be an integer >= 1"),
        ("infinigen:dense_layers=0", "dense_layers must be an integer >= 1"),
        ("infinigen:select=layer", "select must be 'head' or 'token'"),
        ("infinigen:calibration_len=4", "calibration_len must be an integer >= 16"),
        ("offload:host_kv_bytes=-5", "host_kv_bytes must be a positive integer"),
    ],
)
def test_bad_parameters(spec, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("]", r"\]")):
        LLM("dummy:tiny-llama", strategy=spec)


def test_host_pool_smaller_than_one_request():
    with pytest.raises(ConfigError, match="smaller than one request of max_model_len=128"):
        LLM("dummy:tiny-llama", strategy="offload:host_kv_bytes=20000", max_model_len=128)
    # InfiniGen may hold less than max_model_len (it evicts), but a prompt must fit the pool.
    llm = LLM("dummy:tiny-llama", strategy="infinigen:calibration=random,dense_layers=1,host_kv_bytes=20000,block_size=4",
              kv_memory_bytes=8 << 20, max_model_len=128)
    cap = llm.engine.kv.pool.capacity_tokens
    with pytest.raises(RequestError):
        llm.engine.add_request([1] * (cap + 1), SamplingParams(max_tokens=2))
    out = llm.generate([[3] * (cap - 4)], SamplingParams(max_tokens=40, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 40
    assert llm.engine.stats()["host_evicted_tokens"] > 0


def test_tiny_device_budget_names_what_the_user_set():
    """Without host_kv_bytes the host pool follows kv_memory_bytes (or swap_space_bytes): the error
    names that field and the size that works, never a host_kv_bytes=0 the user never set."""
    with pytest.raises(ConfigError) as err:
        LLM("dummy:tiny-llama", strategy="offload", kv_memory_bytes=5000, max_model_len=128)
    msg = str(err.value)
    assert "host_kv_bytes" not in msg
    assert msg.startswith("offload: kv_memory_bytes=5000 serves 9 host tokens (512 device bytes each), fewer than "
                          "the 128 of one request of max_model_len=128; raise kv_memory_bytes to at least 65536")
    LLM("dummy:tiny-llama", strategy="offload", kv_memory_bytes=65536, max_model_len=128)  # the size it names serves
    with pytest.raises(ConfigError, match="infinigen: kv_memory_bytes=1000 serves 1 host tokens .* fewer than "
                                          "the 16 of one block; raise kv_memory_bytes to at least 8960"):
        LLM("dummy:tiny-llama", strategy="infinigen:calibration=random", kv_memory_bytes=1000)
    with pytest.raises(ConfigError, match="offload: swap_space_bytes=1000 caps the host pool at 1 tokens .* raise "
                                          "swap_space_bytes to at least 65536 or give host_kv_bytes"):
        LLM("dummy:tiny-llama", strategy="offload", kv_memory_bytes=4 << 20, swap_space_bytes=1000, max_model_len=128)


@pytest.mark.parametrize("spec", ["infinigen:calibration=random,dense_layers=1,alpha=2,select=head",
                                  "infinigen:calibration=random,dense_layers=1,alpha=2,select=token", "offload"])
def test_static_decode_step_equals_ragged_step(spec):
    """The static-shape decode step (``kv/host_decode.py``, ``kv/infinigen_decode.py``: contexts
    padded, ``k`` masked on the device, padding rows as a captured graph has them) gives the ragged
    step's logits, fetches the same bytes and bumps the same selection counters, for a batch of
    unequal contexts."""
    from kvscope.kv.host_decode import context_bucket

    llm = LLM("dummy:tiny-llama", strategy=spec, kv_memory_bytes=8 << 20, max_model_len=512)
    eng, kv = llm.engine, llm.engine.kv
    rng = random.Random(5)
    for n in (37, 300, 90):
        eng.add_request([rng.randrange(4, 200) for _ in range(n)], SamplingParams(max_tokens=8, ignore_eos=True))
    while not all(r.output_token_ids for r in eng.requests.values()):
        eng.step()
    sched = eng.scheduler.schedule()
    assert sched.num_new_tokens == [1, 1, 1]
    batch = eng.runner.build_batch(sched.requests, sched.num_new_tokens)
    prev, new = kv.step_slots(batch)
    model = eng.model
    selected = getattr(kv, "selected_tokens", torch.zeros(1))  # infinigen's per-layer, per-head counts

    def run(make):
        counters, sel, h2d = kv.pool.counters.clone(), selected.clone(), kv.transfer.stats()["transfer_bytes_h2d"]
        with torch.inference_mode():
            attn = make()
            rows = getattr(attn, "b", 3)  # a padded bucket runs all its rows, as its graph does
            ids = torch.nn.functional.pad(batch.input_ids, (0, rows - 3))
            positions = attn.positions if rows > 3 else batch.positions
            logits = model.compute_logits(model(ids, positions, attn))[:3]
        delta = (kv.pool.counters - counters, selected - sel, kv.transfer.stats()["transfer_bytes_h2d"] - h2d)
        kv.pool.counters.copy_(counters)
        selected.copy_(sel)
        return logits, delta

    def static(b, c):
        def make():
            dec = kv.decode_step(b, c)
            dec.load(prev, new, batch.positions)
            dec.begin()
            return dec
        return make

    ref, (ref_counters, ref_selected, ref_h2d) = run(lambda: kv.attention_class(kv, batch, prev, new))
    longest = max(p.numel() for p in prev)
    assert ref_selected[1:].sum() > 0 or not hasattr(kv, "selected_tokens")
    assert ref_h2d > 0
    for b, c in ((3, longest), (8, context_bucket(longest))):  # exact, and a padded bucket
        logits, (counters, sel, h2d) = run(static(b, c))
        assert torch.allclose(logits, ref, atol=1e-5, rtol=0), (logits - ref).abs().max()
        assert torch.equal(counters, ref_counters)
        assert torch.equal(sel, ref_selected)
        assert h2d == ref_h2d


def test_context_buckets():
    from kvscope.kv.host_decode import context_bucket

    assert [context_bucket(n) for n in (1, 256, 257, 384, 385, 600, 4096, 4097, 20000)] == [
        256, 256, 384, 384, 512, 768, 4096, 6144, 24576]
