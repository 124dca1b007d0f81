"""``kvscope.bench.client_processes``: one HTTP run sent from several client processes, merged into
one run's records, against the stub server of ``benchmarks/http_client_cpu.py``; and ``kvscope bench
serve --client-processes`` writing one result from them."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("aiohttp")
BENCH = Path(__file__).parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

from server_process import free_port, wait_ready  # noqa: E402

from kvscope.bench.client_processes import ClientProcesses  # noqa: E402
from kvscope.errors import ConfigError  # noqa: E402
from kvscope.workload.requests import WorkloadRequest, with_arrivals  # noqa: E402


@pytest.fixture(scope="module")
def stub_url():
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(BENCH / "http_client_cpu.py"), "--stub-port", str(port)])
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, proc, 30)
    yield url
    proc.terminate()
    proc.wait(10)


def _requests(n: int) -> list[WorkloadRequest]:
    return [WorkloadRequest(prompt=list(range(i + 1)), output_len=1, prompt_len=i + 1) for i in range(n)]


def test_offline_run_merges_the_workers_records_in_workload_order(stub_url):
    with ClientProcesses(3) as clients:
        t0 = time.perf_counter()
        run = clients.run(stub_url, _requests(7), "stub", mode="offline", lead_s=0.3)
        wall = time.perf_counter() - t0
    records = run.records
    assert [r.request_id for r in records] == [str(i) for i in range(7)]
    assert [r.prompt_len for r in records] == list(range(1, 8))  # each record is its own request's
    assert run.texts == ["a"] * 7 and all(r.success for r in records) and not run.deadline_reached
    assert len(run.queue_times) == len(run.server_prompt_tokens) == 7
    for r in records:  # one time base: the common start, which every worker waited for
        assert 0 <= r.arrival_time <= r.token_times[0] <= r.finished_time <= run.wall_time_s < wall


def test_timed_run_keeps_each_request_at_its_own_arrival_offset(stub_url):
    offsets = [0.0, 0.05, 0.1, 0.15, 0.2, 0.25]
    with ClientProcesses(2) as clients:
        run = clients.run(stub_url, with_arrivals(_requests(6), offsets), "stub", mode="timed", lead_s=0.3)
    sent = [r.arrival_time for r in run.records]
    # Sent at (or just after) its own offset from the common start, whichever worker sent it.
    for due, at in zip(offsets, sent):
        assert due <= at < due + 0.1
    assert run.wall_time_s >= offsets[-1]


def test_bad_arguments_are_refused():
    with pytest.raises(ConfigError, match="client processes"):
        ClientProcesses(0)
    with ClientProcesses(1) as clients:
        with pytest.raises(ConfigError, match="open-loop"):
            clients.run("http://127.0.0.1:1", _requests(1), "stub", mode="closed")


def test_bench_serve_from_client_processes_writes_one_result(stub_url, tmp_path):
    out = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, "-m", "kvscope.cli", "bench", "serve", "--base-url", stub_url,
                           "--model", "stub", "--dataset", "random", "--num-prompts", "8", "--random-input-len", "16",
                           "--random-output-len", "1", "--client-processes", "2", "--max-concurrency", "4",
                           "--disable-tqdm", "--result-file", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["completed"] == 8 and result["client_processes"] == 2 and result["max_concurrency"] == 4
    assert len(result["ttfts"]) == len(result["input_lens"]) == 8 and result["errors"] == [""] * 8
