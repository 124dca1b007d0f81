"""benchmarks/split_client.py: one offline HTTP run sent from several client processes, merged into
one run's records, against the stub server of benchmarks/http_client_cpu.py."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("aiohttp")
BENCH = Path(__file__).parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

from server_process import free_port, wait_ready  # noqa: E402
from split_client import SplitClient  # noqa: E402

from kvscope.workload.requests import WorkloadRequest  # noqa: E402


@pytest.fixture(scope="module")
def stub_url():
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(BENCH / "http_client_cpu.py"), "--stub-port", str(port)])
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, proc, 30)
    yield url
    proc.terminate()
    proc.wait(10)


def test_split_client_merges_the_workers_records_in_workload_order(stub_url):
    reqs = [WorkloadRequest(prompt=list(range(i + 1)), output_len=1, prompt_len=i + 1) for i in range(7)]
    client = SplitClient(3)
    try:
        t0 = time.perf_counter()
        records, texts = client.run(stub_url, reqs, "stub", lead_s=0.3)
        wall = time.perf_counter() - t0
    finally:
        client.close()
    assert [r.request_id for r in records] == [str(i) for i in range(7)]
    assert [r.prompt_len for r in records] == list(range(1, 8))  # each record is its own request's
    assert texts == ["a"] * 7 and all(r.success for r in records)
    for r in records:  # one time base: the common start, which every worker waited for
        assert 0 <= r.arrival_time <= r.token_times[0] <= r.finished_time < wall


def test_split_client_needs_a_process():
    with pytest.raises(ValueError, match="processes"):
        SplitClient(0)
