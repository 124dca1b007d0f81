"""kvscope advise: cost-model arithmetic, capacity, the advisor's choices, impossible and bad input, CLI."""
from __future__ import annotations

import json
import math

import pytest

from kvscope.advise import (
    SLOs,
    CostModel,
    Hardware,
    StrategyOption,
    advise,
    fixed_workload,
    resolve_model,
)
from kvscope.advise.hardware import H100, hardware_preset
from kvscope.advise.workload import sharegpt_workload, trace_workload
from kvscope.cli import main
from kvscope.errors import ConfigError

GIB = 1 << 30
# Round numbers so that hand computations are exact: 1 TB/s HBM, 100 GB/s PCIe, 1 PFLOP/s, no overhead.
HW = Hardware(name="test", memory_bytes=80 * GIB, hbm_bytes_per_s=1e12, host_device_bytes_per_s=1e11,
              matmul_flops_per_s=1e15, host_memory_bytes=512 * GIB, step_overhead_s_per_layer=0.0,
              speculation_s_per_layer=0.0,
              dtype="bfloat16", is_gpu=True)
LLAMA3 = resolve_model("llama-3-8b")
PAGED = StrategyOption("paged", "paged")


def test_kv_bytes_per_token_and_weights_llama3_8b() -> None:
    cost = CostModel(LLAMA3, HW)
    assert cost.kv_bytes_per_token == 2 * 32 * 8 * 128 * 2 == 131072
    assert cost.weight_bytes == 8_030_261_248 * 2  # Llama-3-8B's published parameter count, bf16


def test_decode_step_time_by_hand() -> None:
    cost = CostModel(LLAMA3, HW)
    batch, context = 8, 4096
    # Memory-bound: weights + every request's KV read once + the 8 new tokens' K/V written.
    hbm = 8_030_261_248 * 2 + 131072 * (batch * context + batch)
    assert cost.decode_step_seconds(PAGED, batch, context) == pytest.approx(hbm / 1e12)
    # h2o at 20% of a 4095-token prompt keeps 409 * 2 + 1 = 819 tokens and reads only those.
    h2o = StrategyOption("h2o:heavy_ratio=0.1,recent_ratio=0.1", "h2o", 0.2)
    hbm_h2o = 8_030_261_248 * 2 + 131072 * (batch * 819 + batch)
    assert cost.decode_step_seconds(h2o, batch, context) == pytest.approx(hbm_h2o / 1e12)
    # offload also fetches the whole KV over PCIe each step, after (not overlapped with) the device work.
    offload = StrategyOption("offload", "offload")
    fetch = 131072 * batch * context / 1e11
    assert cost.decode_step_seconds(offload, batch, context) == pytest.approx(hbm / 1e12 + fetch)


def test_step_overhead_is_per_layer() -> None:
    slow = Hardware(**{**HW.__dict__, "step_overhead_s_per_layer": 1e-3})
    t0 = CostModel(LLAMA3, HW).decode_step_seconds(PAGED, 1, 128)
    assert CostModel(LLAMA3, slow).decode_step_seconds(PAGED, 1, 128) == pytest.approx(t0 + 32e-3)


def test_cpu_prefill_step_by_hand() -> None:
    """The 2-core CPU preset (80 GFLOP/s and 8 GB/s per core, float32): a 210-token prompt of
    SmolLM2-135M in one chunk is matmul-bound, and stays within the 347 ms the quick study's rows
    bound its TTFT by (hardware.py: the earlier 40 GFLOP/s per core predicted 614 ms)."""
    from kvscope.advise.hardware import CPU_STEP_OVERHEAD_S_PER_LAYER, cpu_hardware
    from kvscope.advise.simulate import SimRequest, StepWork

    hw = cpu_hardware(cores=2, memory_bytes=16 * GIB)
    cost = CostModel(resolve_model("smollm2-135m"), hw)
    n = 210
    # 134,515,008 parameters, of which the tied 49152 x 576 embedding (28,311,552) is the LM head:
    # 106,203,456 matmul parameters per token, the LM head on the one last row, and 4 x 30 layers x
    # 9 heads x 64 dims per causal (query, key) pair, 210 x 211 / 2 of them.
    flops = 2 * 106_203_456 * n + 2 * 28_311_552 + 4 * 30 * 9 * 64 * (n * (n + 1) // 2)
    assert flops == 46_193_428_224
    # Weights (float32) + the 210 new tokens' K/V (2 x 30 x 3 x 64 x 4 bytes each), at 16 GB/s: 34 ms.
    hbm = 134_515_008 * 4 + 46_080 * n
    assert hbm / 16e9 < flops / 160e9
    step = cost.step_seconds(PAGED, StepWork([], [(SimRequest(0.0, n, 16), n)]))
    assert step == pytest.approx(30 * CPU_STEP_OVERHEAD_S_PER_LAYER + flops / 160e9)
    assert step < 0.347


def test_eager_steps_pay_the_eager_overhead() -> None:
    """Decode-only steps replay CUDA graphs (the replayed overhead), offload's too; a step with a
    prefill chunk, and every step of a strategy without graph_decode (pyramidkv), run eagerly (the
    eager one). Unset, the eager overhead is the replayed one."""
    from kvscope.advise.simulate import SimRequest, StepWork

    hw = Hardware(**{**HW.__dict__, "step_overhead_s_per_layer": 1e-4, "eager_step_overhead_s_per_layer": 1e-3})
    base, cost = CostModel(LLAMA3, HW), CostModel(LLAMA3, hw)
    offload = StrategyOption("offload", "offload")
    decode = StepWork([SimRequest(0.0, 127, 2, computed=127, generated=1)], [])
    mixed = StepWork([SimRequest(0.0, 127, 2, computed=127, generated=1)], [(SimRequest(0.0, 64, 2), 64)])
    assert cost.step_seconds(PAGED, decode) == pytest.approx(base.step_seconds(PAGED, decode) + 32 * 1e-4)
    assert cost.step_seconds(PAGED, mixed) == pytest.approx(base.step_seconds(PAGED, mixed) + 32 * 1e-3)
    assert cost.step_seconds(offload, decode) == pytest.approx(base.step_seconds(offload, decode) + 32 * 1e-4)
    layered = StrategyOption("pyramidkv", "pyramidkv")
    assert not layered.facts.graph_decode
    assert cost.step_seconds(layered, decode) == pytest.approx(base.step_seconds(layered, decode) + 32 * 1e-3)
    unset = {k: v for k, v in HW.__dict__.items() if k != "eager_step_overhead_s_per_layer"}
    assert Hardware(**{**unset, "step_overhead_s_per_layer": 2e-4}).eager_step_overhead_s_per_layer == 2e-4
    # The calibration knob moves both, keeping their measured difference.
    moved = hw.with_step_overhead(3e-4)
    assert (moved.step_overhead_s_per_layer, moved.eager_step_overhead_s_per_layer) == pytest.approx((3e-4, 1.2e-3))


def test_capacity_from_the_kv_pool() -> None:
    cost = CostModel(LLAMA3, HW, kv_memory=GIB)
    assert cost.pool_tokens(PAGED) == GIB // 131072 == 8192
    w = fixed_workload(1000, 24, math.inf, num_requests=32)  # 1024 tokens = 64 blocks each
    pred = cost.predict(PAGED, w)
    assert pred.feasible and pred.max_concurrent == 8
    assert pred.peak_kv_bytes == 8 * 1024 * 131072


def test_too_long_request_is_reported_not_raised() -> None:
    pred = CostModel(LLAMA3, HW, kv_memory=64 << 20).predict(PAGED, fixed_workload(1000, 24, math.inf, 4))
    assert not pred.feasible and "do not fit the KV pool" in pred.problem


def test_advisor_picks_paged_with_plentiful_memory_and_short_requests() -> None:
    a = advise(fixed_workload(128, 32, 4.0, 40), LLAMA3, H100, SLOs(ttft_ms=1000, tpot_ms=100), quality_floor=0.8)
    assert a.feasible and a.source == "cost_model"
    assert a.recommended == "paged"
    assert a.runner_up is not None and a.expected["output_throughput"] > 0


def test_advisor_evicts_or_offloads_when_kv_does_not_fit() -> None:
    # 4k-token prompts and a 1 GiB pool: a lossless on-device cache holds about 2 requests at a time.
    w = fixed_workload(4000, 64, math.inf, 32)
    a = advise(w, LLAMA3, H100, quality_floor=0.8, kv_memory=GIB)
    assert a.feasible
    assert a.recommended.split(":")[0] in ("h2o", "snapkv", "streaming", "offload", "infinigen")


def test_infeasible_model_too_big() -> None:
    small = Hardware(**{**HW.__dict__, "memory_bytes": 8 * GIB})
    a = advise(fixed_workload(128, 32, 1.0, 8), LLAMA3, small)
    assert not a.feasible and a.recommended is None
    assert "does not fit" in a.message and "GiB" in a.message


def test_infeasible_slo() -> None:
    a = advise(fixed_workload(128, 32, 1.0, 8), LLAMA3, H100, SLOs(tpot_ms=0.001))
    assert not a.feasible
    assert "no strategy meets" in a.message and "TPOT" in a.message


@pytest.mark.parametrize("call, field", [
    (lambda: SLOs(tpot_ms=-1), "slos.tpot_ms"),
    (lambda: fixed_workload(0, 32, 1.0), "workload.prompt_len"),
    (lambda: fixed_workload(128, 32, -2.0), "workload.rate"),
    (lambda: advise(fixed_workload(128, 32, 1.0, 4), LLAMA3, H100, quality_floor=1.5), "quality_floor"),
    (lambda: CostModel(LLAMA3, HW, kv_memory=1.5), "kv_memory"),
    (lambda: HW.with_overrides(memory_bytes=-1), "hardware.memory_bytes"),
    (lambda: resolve_model("no-such-model"), "model"),
])
def test_bad_input_names_the_field(call, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        call()


def test_measured_rows_used_when_they_cover_the_case() -> None:
    def row(strategy: str, thr: float) -> dict:
        metrics = {"completed": 32, "failed": 0, "total_input_tokens": 32 * 512, "total_output_tokens": 32 * 64,
                   "output_throughput": thr, "request_throughput": thr / 64, "mean_ttft_ms": 100.0,
                   "p90_ttft_ms": 150.0, "mean_tpot_ms": 20.0, "p90_tpot_ms": 25.0, "mean_e2el_ms": 1400.0}
        return {"status": "ok", "config": {"model": "dummy:llama-3-8b", "strategy": strategy, "kv_memory": 0.9,
                                           "rate": "inf", "device": "cuda"},
                "metrics": metrics, "environment": {"device_name": "NVIDIA H100 80GB HBM3"}}

    rows = [row("paged", 500.0), row("h2o:heavy_ratio=0.1,recent_ratio=0.1", 900.0)]
    a = advise(fixed_workload(512, 64, math.inf, 32), LLAMA3, H100, quality_floor=0.8, results=rows)
    assert a.source == "measured" and a.recommended.startswith("h2o")
    assert a.runner_up == "paged"
    assert a.engine_args["kv_memory"] == 0.9  # the settings the measured rows ran with
    other_gpu = advise(fixed_workload(512, 64, math.inf, 32), LLAMA3, HW, quality_floor=0.8, results=rows)
    assert other_gpu.source == "cost_model"


def test_cli_json(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["advise", "--model", "llama-3-8b", "--hardware", "h100", "--prompt-len", "256", "--output-len", "32",
               "--rate", "2", "--num-requests", "20", "--ttft-ms", "2000", "--tpot-ms", "200", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["feasible"] and out["recommended"] and out["source"] == "cost_model"
    assert {"output_throughput", "p90_ttft_ms", "p90_tpot_ms"} <= set(out["expected"])


def test_cli_infeasible_is_a_message(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["advise", "--model", "dummy:opt-30b", "--hardware", "h100", "--gpu-memory", "40GiB",
               "--num-requests", "4"])
    assert rc == 1 and "does not fit" in capsys.readouterr().out


def test_cli_bad_hardware(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["advise", "--hardware", "tpu"]) == 2
    assert "hardware" in capsys.readouterr().err


def test_trace_and_dataset_workloads(tmp_path) -> None:
    trace = tmp_path / "trace.jsonl"
    trace.write_text('{"arrival_time": 0.0, "prompt": [1, 2, 3], "output_len": 4}\n'
                     '{"arrival_time": 0.5, "prompt": "x' + 'y' * 399 + '", "output_len": 8}\n'
                     '{"arrival_time": 1.0, "prompt": "hi", "prompt_len": 50, "output_len": 2}\n')
    w = trace_workload(trace)
    assert w.prompt_lens == (3, 100, 50) and w.output_lens == (4, 8, 2)
    assert w.rate == pytest.approx(2.0) and w.arrivals() == [0.0, 0.5, 1.0]
    s = sharegpt_workload(4.0, num_requests=10).summary()
    assert s["mean_prompt_len"] == 161 and s["mean_output_len"] == 338


def test_hardware_presets() -> None:
    cpu = hardware_preset("cpu")
    assert not cpu.is_gpu and cpu.dtype == "float32" and cpu.memory_bytes > 0
    assert hardware_preset("h200").memory_bytes > H100.memory_bytes
    assert hardware_preset("this").memory_bytes > 0
    fast = H100.with_overrides(hbm_bytes_per_s=4e12)
    assert fast.hbm_bytes_per_s == 4e12 and fast.sources["hbm_bytes_per_s"] == "user override"


@pytest.mark.parametrize("limits, field", [
    (dict(max_num_seqs=0), "max_num_seqs"), (dict(max_num_batched_tokens=0), "max_num_batched_tokens"),
    (dict(max_num_seqs=2.5), "max_num_seqs"), (dict(max_num_batched_tokens=True), "max_num_batched_tokens"),
])
def test_engine_limits_reject_what_would_never_end(limits: dict, field: str) -> None:
    from kvscope.advise.simulate import EngineLimits

    with pytest.raises(ConfigError, match=f"^{field}: must be an integer >= 1"):
        EngineLimits(**limits)


def test_workload_rejects_arrivals_that_are_not_times() -> None:
    from kvscope.advise.workload import Workload

    with pytest.raises(ConfigError, match="^workload.arrival_times: must be finite seconds >= 0, got nan"):
        Workload((4, 4), (2, 2), 1.0, arrival_times=(0.0, math.nan))


def _simulate_in_thread(workload, limits, timeout: float = 30.0):
    """simulate() in a daemon thread: a replay that never ends fails the test instead of hanging it."""
    import threading

    from kvscope.advise.simulate import simulate

    out: dict = {}

    def target() -> None:
        try:
            out["result"] = simulate(workload, 1000, limits, lambda r: r.prompt_len + r.output_len, lambda r: r.held,
                                     lambda w: 1e-3)
        except Exception as e:  # noqa: BLE001 - handed to the test
            out["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), "simulate() did not return"
    return out


def test_simulation_is_bounded() -> None:
    """Inputs that get past validation (here forced past it) and would stall the replay make it
    raise a kvscope error at its iteration cap instead of spinning."""
    from kvscope.advise.simulate import EngineLimits, SimulationError, max_iterations
    from kvscope.advise.workload import Workload

    w = Workload((8, 8), (4, 4), 1.0)
    ok = _simulate_in_thread(w, EngineLimits())["result"]
    assert len(ok.ttft) == 2 and ok.steps <= max_iterations(w) == 8 + 8 + 4 + 4 + 2 * 2 + 1
    stalled = EngineLimits()
    object.__setattr__(stalled, "max_num_seqs", 0)  # admits nothing
    err = _simulate_in_thread(w, stalled)["error"]
    assert isinstance(err, SimulationError) and "made no progress in 29 iterations" in str(err)
    object.__setattr__(w, "arrival_times", (math.nan, 0.0))  # a request that never arrives
    assert isinstance(_simulate_in_thread(w, EngineLimits())["error"], SimulationError)


def test_cli_zero_limits_exit_at_once() -> None:
    """``kvscope advise --max-num-seqs 0`` used to never return; it is a usage error now."""
    import subprocess
    import sys

    for flag in ("--max-num-seqs", "--max-num-batched-tokens"):
        out = subprocess.run([sys.executable, "-m", "kvscope.cli", "advise", "--model", "dummy:tiny-llama",
                              "--hardware", "cpu", "--num-requests", "2", flag, "0"],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 2 and f"argument {flag}: must be an integer >= 1, got '0'" in out.stderr


def test_quality_uses_the_models_own_figures_when_measured() -> None:
    from kvscope.advise.quality import quality

    # Qwen2.5-0.5B (h200-quality): full KV 35.36, infinigen 20% 46.77 and no needle found.
    q = quality("infinigen", 0.2, model="qwen2.5-0.5b")
    assert q.score == pytest.approx(35.36 / 46.77) and q.ruler_accuracy == 0.0
    assert (q.source, q.measured_on) == ("measured (qwen2.5-0.5b)", "qwen2.5-0.5b")
    assert quality("snapkv", 0.2, model="dummy:qwen2.5-0.5b").ruler_accuracy == 1.0  # a dummy stands for the real one
    assert quality("paged", None, lossless=True, model="qwen2.5-0.5b").ruler_accuracy == 1.0
    # A model without figures of its own gets SmolLM2's (22.10 full, 32.09 at 20%), said as such.
    other = quality("infinigen", 0.2, model="dummy:llama-3-8b")
    assert other.score == pytest.approx(22.10 / 32.09) and other.ruler_accuracy == 0.62
    assert other.measured_on == "smollm2-135m"
    assert quality("snapkv", 0.2, model="llama-3-8b").score == pytest.approx(22.10 / 23.57)
    assert quality("snapkv", 0.5, model="llama-3-8b").source == "unknown"  # not measured at 50%


def test_advice_names_the_model_its_quality_comes_from() -> None:
    tight = dict(quality_floor=0.0, kv_memory=64 << 20)
    w = fixed_workload(4000, 64, math.inf, 64)
    qwen = advise(w, resolve_model("qwen2.5-0.5b"), H100, **tight)
    assert qwen.recommended == "h2o:heavy_ratio=0.05,recent_ratio=0.05"  # measured on Qwen2.5 itself
    assert not any("measured on" in r for r in qwen.reasons)
    smol_figures = advise(w, resolve_model("qwen2.5-7b"), H100, quality_floor=0.0, kv_memory=256 << 20)
    assert smol_figures.recommended == "h2o:heavy_ratio=0.05,recent_ratio=0.05"  # no figures of its own
    assert any("measured on smollm2-135m, not on this model" in r for r in smol_figures.reasons)
