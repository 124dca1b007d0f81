"""The HTTP load generator against a stub OpenAI server on a loopback port: timings against the
stub's set delays, token counts, failures, the deadline, the loopback rule and the CLI's result file.

The stub (``openai_stub.py``) sends each request's first token 50 ms after it arrives and the next
ones 10 ms apart. Measured times include the client's and the server's event loops on a shared
machine, so the checks allow a few ms below and tens of ms above the set delays.
"""
from __future__ import annotations

import json
import socket

import pytest
from openai_stub import MODEL_ID, openai_stub

from kvscope import cli
from kvscope.bench.endpoints import api_url, check_base_url, is_loopback
from kvscope.bench.http_bench import KVSCOPE_FIELDS
from kvscope.bench.http_driver import run_http_workload
from kvscope.bench.metrics import serving_metrics
from kvscope.errors import ConfigError
from kvscope.workload.arrivals import ClosedLoop
from kvscope.workload.requests import WorkloadRequest, write_trace


def _ms(seconds: float) -> float:
    return seconds * 1000.0


def test_timings_and_token_counts_match_the_stub():
    reqs = [WorkloadRequest([7, 8, 9, 10], 5, arrival_time=0.03 * i) for i in range(4)]
    with openai_stub() as stub:
        run = run_http_workload(stub.base_url, reqs, MODEL_ID)
    m = serving_metrics(run.records)
    assert m["completed"] == 4 and m["failed"] == 0
    assert 48 <= m["median_ttft_ms"] <= 110
    assert 9 <= m["median_itl_ms"] <= 25 and 9 <= m["mean_tpot_ms"] <= 25
    assert 48 + 4 * 9 <= m["median_e2el_ms"] <= 200
    assert m["total_output_tokens"] == 20 and m["total_input_tokens"] == 16
    for r in run.records:
        assert len(r.token_times) == 5 and r.output_tokens == 5 and r.finish_reason == "length"
    assert run.texts == ["t0 t1 t2 t3 t4 "] * 4
    # Sent as vLLM sends it: token ids as the prompt, greedy, exactly max_tokens, usage asked for.
    body = stub.bodies[0]
    assert body["prompt"] == [7, 8, 9, 10] and body["max_tokens"] == 5 and body["model"] == MODEL_ID
    assert body["ignore_eos"] is True and body["temperature"] == 0.0 and body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    # Arrivals follow the schedule: each request sent about when it was due.
    assert all(q is not None and q < 0.02 for q in run.queue_times)
    assert [round(r.arrival_time, 2) for r in run.records] == pytest.approx([0.0, 0.03, 0.06, 0.09], abs=0.02)


def test_output_tokens_come_from_usage_else_from_chunks():
    """Two tokens per chunk: with usage, 6 tokens over 3 chunks (TPOT = span / 5, ITL per chunk, as
    vLLM computes them); without usage, the 3 chunks are the count."""
    req = [WorkloadRequest("a b c", 6)]
    with openai_stub(tokens_per_chunk=2) as stub:
        with_usage = serving_metrics(run_http_workload(stub.base_url, req, MODEL_ID).records)
        stub.usage = False
        without = serving_metrics(run_http_workload(stub.base_url, req, MODEL_ID).records)
    assert with_usage["total_output_tokens"] == 6 and without["total_output_tokens"] == 3
    span = with_usage["mean_e2el_ms"] - with_usage["mean_ttft_ms"]  # two 20 ms gaps
    assert 38 <= span <= 80
    assert with_usage["mean_tpot_ms"] == pytest.approx(span / 5)
    assert 19 <= with_usage["median_itl_ms"] <= 40
    assert without["mean_tpot_ms"] == pytest.approx((without["mean_e2el_ms"] - without["mean_ttft_ms"]) / 2)
    assert with_usage["total_input_tokens"] == 3  # a text prompt of unknown length: the server's count


def test_tokens_that_come_all_in_an_empty_finishing_chunk_count_by_usage():
    """A server behind on a stream may send all of a request's tokens in its finishing chunk; when
    they decode to no text, usage's count says they came: one token time, the server's count.
    Without usage nothing says so, and the request fails."""
    req = [WorkloadRequest([5, 6], 4)]
    with openai_stub(tokens_per_chunk=4, generate=lambda prompt, n: "") as stub:
        with_usage = run_http_workload(stub.base_url, req, MODEL_ID).records[0]
        stub.usage = False
        without = run_http_workload(stub.base_url, req, MODEL_ID).records[0]
    assert with_usage.error is None and len(with_usage.token_times) == 1 and with_usage.output_tokens == 4
    assert with_usage.finish_reason == "length"
    assert without.error == "the response stream carried no token (finish_reason='length')"


def test_chat_ttft_waits_for_content_not_the_role_chunk():
    with openai_stub() as stub:
        run = run_http_workload(stub.base_url, [WorkloadRequest("hi there", 3)], MODEL_ID,
                                endpoint="/v1/chat/completions")
    m = serving_metrics(run.records)
    assert m["completed"] == 1 and m["median_ttft_ms"] >= 48  # the role chunk came at once
    assert run.texts == ["t0 t1 t2 "] and stub.bodies[0]["messages"] == [{"role": "user", "content": "hi there"}]


def test_failures_are_recorded_per_request_and_the_run_goes_on():
    reqs = [WorkloadRequest("fine", 2), WorkloadRequest("please FAIL", 2), WorkloadRequest("fine too", 2)]
    with openai_stub() as stub:
        run = run_http_workload(stub.base_url, reqs, MODEL_ID)
    assert [r.success for r in run.records] == [True, False, True]
    assert run.records[1].error.startswith("HTTP 500") and "stub failure" in run.records[1].error
    assert serving_metrics(run.records)["failed"] == 1

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    run = run_http_workload(closed, reqs[:2], MODEL_ID)
    assert all(not r.success and "Connect" in r.error for r in run.records)


def test_deadline_cancels_running_requests_and_skips_unsent_ones():
    reqs = [WorkloadRequest("quick", 3), WorkloadRequest("SLOW one", 5),
            WorkloadRequest("late", 2, arrival_time=5.0)]
    with openai_stub() as stub:
        run = run_http_workload(stub.base_url, reqs, MODEL_ID, max_duration_s=0.6)
    assert run.deadline_reached and run.wall_time_s < 1.5
    quick, slow, late = run.records
    assert quick.success
    assert not slow.success and slow.error.startswith("still running at the run's deadline (max_duration_s=0.6)")
    assert not late.success and late.error.startswith("not sent at the run's deadline")
    assert run.queue_times[2] is None and len(stub.bodies) == 2
    assert serving_metrics(run.records)["failed"] == 2


def test_per_request_timeout():
    with openai_stub() as stub:
        run = run_http_workload(stub.base_url, [WorkloadRequest("SLOW", 4), WorkloadRequest("ok", 2)], MODEL_ID,
                                request_timeout_s=0.3)
    slow, ok = run.records
    assert "timed out after 0.3 s" in slow.error and ok.success and not run.deadline_reached


def test_max_concurrency_and_closed_loop_cap_requests_in_flight():
    reqs = [WorkloadRequest("x", 2) for _ in range(4)]
    with openai_stub() as stub:
        capped = run_http_workload(stub.base_url, reqs, MODEL_ID, max_concurrency=1)
        closed = run_http_workload(stub.base_url, reqs, MODEL_ID, mode=ClosedLoop(clients=2))

    def most_in_flight(records) -> int:
        events = sorted([(r.arrival_time, 1) for r in records] + [(r.finished_time, -1) for r in records])
        level = peak = 0
        for _, step in events:
            level += step
            peak = max(peak, level)
        return peak

    assert most_in_flight(capped.records) == 1 and most_in_flight(closed.records) == 2
    # Waiting for the cap is queue time, not TTFT (vLLM's convention): every TTFT stays ~50 ms.
    assert capped.queue_times[3] >= 3 * 0.05
    assert serving_metrics(capped.records)["p99_ttft_ms"] < 110
    with pytest.raises(ConfigError, match="max_concurrency must be"):
        run_http_workload("http://127.0.0.1:1", reqs, MODEL_ID, max_concurrency=0)


@pytest.mark.parametrize("url, ok", [
    ("http://127.0.0.1:8000", True), ("http://127.3.4.5:1/v1", True), ("http://localhost:80", True),
    ("http://[::1]:8000", True), ("http://10.0.0.1:8000", False), ("https://api.example.com/v1", False),
    ("http://0.0.0.0:8000", False),
])
def test_only_loopback_hosts_unless_allowed(url, ok):
    if ok:
        assert check_base_url(url) == url.rstrip("/")
    else:
        with pytest.raises(ConfigError, match=r"^--base-url: host .* is not loopback .*--allow-remote"):
            check_base_url(url)
        assert check_base_url(url, allow_remote=True) == url
    assert is_loopback("127.0.0.1") and not is_loopback("example.com")
    assert api_url("http://h:1/v1", "/v1/completions") == api_url("http://h:1", "/v1/completions") \
        == "http://h:1/v1/completions"


def test_cli_refuses_a_remote_host_before_sending_anything(capsys):
    assert cli.main(["bench", "serve", "--base-url", "http://192.0.2.1:8000", "--dataset", "random"]) == 2
    assert "--base-url: host '192.0.2.1' is not loopback" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["bench", "serve", "--base-url", "http://127.0.0.1:1", "--goodput", "ttft"])


def test_cli_writes_vllms_result_fields(tmp_path, capsys):
    out = tmp_path / "res.json"
    with openai_stub() as stub:
        code = cli.main(["bench", "serve", "--base-url", stub.base_url + "/v1", "--dataset", "random",
                         "--tokenizer", "dummy:tiny-llama", "--num-prompts", "4", "--random-input-len", "16",
                         "--random-output-len", "4", "--request-rate", "50", "--goodput", "ttft:1000", "tpot:100",
                         "--result-file", str(out), "--disable-tqdm"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "Serving Benchmark Result" in printed and "Successful requests:" in printed
    res = json.loads(out.read_text())
    vllm_fields = ["date", "endpoint_type", "backend", "label", "model_id", "tokenizer_id", "num_prompts",
                   "request_rate", "burstiness", "max_concurrency", "duration", "completed", "failed",
                   "total_input_tokens", "total_output_tokens", "request_throughput", "request_goodput",
                   "output_throughput", "total_token_throughput", "input_lens", "output_lens", "ttfts", "itls",
                   "latencies", "queue_times", "generated_texts", "errors", "mean_ttft_ms", "median_ttft_ms",
                   "std_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "median_tpot_ms", "p99_tpot_ms", "mean_itl_ms",
                   "median_itl_ms", "p99_itl_ms", "mean_e2el_ms", "median_e2el_ms", "p99_e2el_ms"]
    assert [k for k in vllm_fields if k not in res] == []
    assert [k for k in KVSCOPE_FIELDS if k not in res] == ["ruler"]  # RULER datasets only
    assert res["model_id"] == MODEL_ID and res["backend"] == "openai" and res["request_rate"] == 50.0
    assert res["completed"] == res["num_prompts"] == 4 and res["errors"] == [""] * 4
    assert res["input_lens"] == [16] * 4 and res["output_lens"] == [4] * 4
    assert all(len(itl) == 3 for itl in res["itls"]) and all(0.045 < t < 0.15 for t in res["ttfts"])
    assert res["request_goodput"] == pytest.approx(res["request_throughput"])
    assert res["generated_texts"][0] == "t0 t1 t2 t3 "
    assert all(isinstance(b["prompt"], list) and len(b["prompt"]) == 16 for b in stub.bodies)


def test_cli_trace_keeps_its_arrival_times(tmp_path):
    trace = tmp_path / "t.jsonl"
    write_trace(trace, [WorkloadRequest("one two three", 2, arrival_time=0.0),
                        WorkloadRequest("four five", 2, arrival_time=0.25)])
    out = tmp_path / "res.json"
    with openai_stub() as stub:
        assert cli.main(["bench", "serve", "--base-url", stub.base_url, "--dataset", "trace", "--trace", str(trace),
                         "--tokenizer", "dummy:tiny-llama", "--model", "given", "--result-file", str(out),
                         "--disable-tqdm"]) == 0
    res = json.loads(out.read_text())
    assert res["model_id"] == "given" and stub.bodies[0]["model"] == "given"
    assert res["input_lens"] == [13, 9]  # the byte-level tokenizer's counts, not the server's word counts
    assert res["server_input_lens"] == [3, 2]
    # The second request is sent 0.25 s in: the run cannot end sooner. Its latency includes the
    # client's own time, which a loaded machine stretches, hence the loose window on its send time.
    assert res["duration"] >= 0.25 and 0.2 <= res["duration"] - res["latencies"][1] <= 0.45


def test_cli_names_the_bad_option(capsys):
    for args, message in ((["--request-rate", "-1"], "--request-rate: must be a number > 0"),
                          (["--max-duration-s", "0"], "--max-duration-s: must be a number > 0"),
                          (["--dataset", "trace"], "--trace: the trace dataset needs a JSONL file")):
        assert cli.main(["bench", "serve", "--base-url", "http://127.0.0.1:1", "--tokenizer", "dummy:tiny-llama",
                         *args]) == 2
        assert message in capsys.readouterr().err


def test_load_tokenizer_reads_no_weights(tmp_path, monkeypatch):
    from hf_ref import make_tiny_checkpoint

    from kvscope.errors import ModelLoadError
    from kvscope.models import loader

    make_tiny_checkpoint("llama", tmp_path)  # safetensors and config.json, no tokenizer files
    monkeypatch.setattr(loader, "load_safetensors_folder", lambda *a: pytest.fail("weights were loaded"))
    assert loader.load_tokenizer(str(tmp_path)).encode("hi") == [104, 105]  # byte-level, as load_model gives it
    assert loader.load_tokenizer("dummy:tiny-llama").encode("hi") == [104, 105]
    with pytest.raises(ModelLoadError, match="unknown model 'no-such-model'"):
        loader.load_tokenizer("no-such-model")
