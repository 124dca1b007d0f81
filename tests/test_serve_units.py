"""``kvscope serve`` pieces on their own: streamed text deltas, the templated chunks against the
pydantic models' JSON, error field names, and the command line (parsing, the missing-extra
message, and a real ``kvscope serve`` process answering on loopback)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

pytest.importorskip("fastapi")

from kvscope.cli import build_parser, main  # noqa: E402
from kvscope.engine.outputs import CompletionOutput  # noqa: E402
from kvscope.engine.sampling_params import SamplingParams  # noqa: E402
from kvscope.models.tokenizer import Tokenizer  # noqa: E402
from kvscope.serve import openai_chat, openai_completions  # noqa: E402
from kvscope.serve.app import _param  # noqa: E402
from kvscope.serve.detokenize import TextDeltas  # noqa: E402
from kvscope.serve.generation import sse  # noqa: E402
from kvscope.serve.params import Plan  # noqa: E402
from kvscope.serve.protocol import ChatStreamChoice, CompletionChoice, DeltaMessage  # noqa: E402


TOKENIZER = Tokenizer.byte_level(512)  # token id = byte value


def _completion(text: bytes, finished: bool = False, text_end: int | None = None) -> CompletionOutput:
    return CompletionOutput(index=0, token_ids=list(text), finish_reason="stop" if finished else None,
                            _decode=TOKENIZER.decode, text_end=text_end)


def test_decode_matches_the_transformers_tokenizer() -> None:
    # Tokenizer.decode may skip transformers' wrapper; the text must be transformers' own, with ids
    # beyond the tokenizer's vocabulary dropped and the special token kept or skipped as asked.
    hf = TOKENIZER._tok
    ids = [*"h\u00e9llo \u20ac".encode(), 256, 300, 0xE2, 511]
    known = [i for i in ids if i < 257]
    for skip in (True, False):
        assert TOKENIZER.decode(ids, skip_special_tokens=skip) == hf.decode(known, skip_special_tokens=skip)
    assert TOKENIZER.decode(ids[:-4]) == "h\u00e9llo \u20ac"


def test_text_deltas_hold_back_an_incomplete_utf8_sequence() -> None:
    d = TextDeltas(TOKENIZER, SamplingParams())
    euro = "\u20ac".encode()  # three bytes, three tokens
    assert d.next(_completion(b"ab" + euro[:1])) == "ab"
    assert d.next(_completion(b"ab" + euro[:2])) == ""
    assert d.next(_completion(b"ab" + euro)) == "\u20ac"
    assert d.next(_completion(b"ab" + euro + euro[:1], finished=True)) == "\ufffd"  # at the end, all goes out


def test_text_deltas_hold_back_what_a_stop_string_could_still_cut() -> None:
    d = TextDeltas(TOKENIZER, SamplingParams(stop=["STOP", "x"]))
    assert d.next(_completion(b"hello S")) == "hell"  # "o S" could begin "STOP"
    assert d.next(_completion(b"hello ST")) == "o"
    assert d.next(_completion(b"hello STOP", finished=True, text_end=6)) == " "  # the engine cut at "STOP"
    keep = TextDeltas(TOKENIZER, SamplingParams(stop=["STOP"], include_stop_str_in_output=True))
    assert keep.next(_completion(b"hello S")) == "hello S"


@pytest.mark.slow
def test_text_deltas_concatenate_to_the_full_decode(smollm2) -> None:
    """Incremental decoding with a real BPE tokenizer (spaces, multi-byte characters) adds up to
    the decode of all tokens, whatever the chunking."""
    tok = smollm2.tokenizer
    ids = tok.encode("Déjà vu: the naïve café's crème brûlée, 3.14 × 2 ≈ 6.28 — \u2603 \U0001F600 ok.")
    for step in (1, 2, 3, 7):
        d = TextDeltas(tok, SamplingParams())
        pieces = [d.next(CompletionOutput(0, ids[:n], None, tok.decode)) for n in range(step, len(ids), step)]
        pieces.append(d.next(CompletionOutput(0, ids, "length", tok.decode)))
        assert "".join(pieces) == tok.decode(ids)
        assert all("\ufffd" not in p for p in pieces)


@pytest.mark.parametrize("include_usage", [False, True])
@pytest.mark.parametrize(("text", "reason"), [('h\u00e9 "q" \\ \n\t\u20ac \U0001F600 \x01', None), ("x", "length"),
                                              (" ", "stop")])
def test_templated_chunks_equal_the_pydantic_chunks(text: str, reason: str | None, include_usage: bool) -> None:
    plan = Plan([[1], [2]], SamplingParams(n=2), None, True, include_usage, "prompt")
    completions = openai_completions._Chunks("tiny", "cmpl-1", plan, TOKENIZER, None)
    expected = sse(completions._chunk([CompletionChoice(index=3, text=text, finish_reason=reason)]), include_usage)
    assert completions._text_events(3)(text, reason) == expected
    chat = openai_chat._Chunks("tiny", "chatcmpl-1", plan, TOKENIZER, None)
    assert chat._content_events(1)(text, reason) == chat._event(
        [ChatStreamChoice(index=1, delta=DeltaMessage(content=text), finish_reason=reason)])


def test_error_param_names() -> None:
    assert _param(["messages", 0, "content", "str"]) == "messages[0].content"
    assert _param(["prompt", "list[list[int]]", 0, 1]) == "prompt[0][1]"
    assert _param(["stream_options", "include_usage"]) == "stream_options.include_usage"
    assert _param([]) is None


def test_serve_command_line() -> None:
    args = build_parser().parse_args(["serve", "dummy:tiny-llama", "--strategy", "h2o:heavy_ratio=0.2",
                                      "--kv-memory", "16MiB", "--port", "9000", "--max-queue", "8",
                                      "--served-model-name", "tiny"])
    assert (args.model, args.strategy, args.kv_memory, args.port, args.max_queue, args.served_model_name) == (
        "dummy:tiny-llama", "h2o:heavy_ratio=0.2", 16 << 20, 9000, 8, "tiny")
    assert args.host == "127.0.0.1"


def test_serve_without_the_extra_says_what_to_install(monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # makes `import uvicorn` raise ImportError
    assert main(["serve", "dummy:tiny-llama"]) == 2
    assert "pip install 'kvscope[serve]'" in capsys.readouterr().err


def test_kvscope_serve_process_answers_and_stops_on_sigint() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "kvscope.cli", "serve", "dummy:tiny-llama", "--kv-memory", "4MiB",
           "--served-model-name", "tiny", "--port", str(port), "--log-level", "warning"]
    proc = subprocess.Popen(cmd, env=os.environ.copy(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        base, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "kvscope serve did not come up"
            time.sleep(0.2)
        r = httpx.post(f"{base}/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 3}, timeout=30)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
        assert "Traceback" not in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_loop_times_bucket_each_turn_by_its_length_and_render_as_a_prometheus_histogram():
    from kvscope.serve.engine_core import LoopTimes
    from kvscope.serve.metrics import EngineStatsCollector

    times = LoopTimes()
    times.add(0.0004, 0.0, 0.0001)  # 0.5 ms: the first bucket (<= 1 ms)
    times.add(0.0, 0.001, 0.0)  # exactly 1 ms: still <= 1 ms
    times.add(0.1, 0.9, 0.1)  # 1.1 s: <= 2.5 s
    times.add(3.0, 0.0, 0.0)  # past every bound
    stats = times.stats()
    assert stats["core_turns"] == 4 and stats["core_turn_buckets"] == [2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1]
    assert stats["core_admit_seconds"] == pytest.approx(3.1004) and stats["core_step_seconds"] == pytest.approx(0.901)
    assert stats["core_output_seconds"] == pytest.approx(0.1001)
    assert stats["core_turn_seconds_sum"] == pytest.approx(4.1015)

    families = {f.name: f for f in EngineStatsCollector("m", lambda: stats, lambda: 0).collect()}
    samples = families["kvscope:engine_core_turn_seconds"].samples
    buckets = {s.labels["le"]: s.value for s in samples if s.name.endswith("_bucket")}
    assert buckets["0.001"] == 2 and buckets["1.0"] == 2 and buckets["2.5"] == 3 and buckets["+Inf"] == 4
    assert {s.name: s.value for s in samples if not s.name.endswith("_bucket")} == {
        "kvscope:engine_core_turn_seconds_count": 4, "kvscope:engine_core_turn_seconds_sum": pytest.approx(4.1015)}
    assert families["kvscope:engine_core_step_seconds"].samples[0].value == pytest.approx(0.901)


def test_a_slow_core_turn_is_logged_with_its_parts_and_the_tokens_of_its_step(monkeypatch, caplog):
    import threading
    from multiprocessing import Pipe

    from kvscope import LLM
    from kvscope.serve import engine_core
    from kvscope.serve.engine_core import ADD, STOP, EngineCore, recv, send

    monkeypatch.setattr(engine_core, "SLOW_TURN_S", 0.0)  # every working turn is "slow"
    llm = LLM("dummy:tiny-llama", "paged", kv_memory_bytes=8 << 20, max_num_batched_tokens=64)
    core_commands, commands = Pipe(duplex=False)
    outputs, core_outputs = Pipe(duplex=False)
    core = threading.Thread(target=EngineCore(llm, [(core_commands, core_outputs)]).run)
    core.start()
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    with caplog.at_level("WARNING", logger="kvscope.serve"):
        send(commands, [(ADD, ["r0"], [list(range(1, 101))], params, time.time())])
        finished = False
        while not finished:
            _, deltas, _ = recv(outputs)
            finished = any(d[3] for d in deltas)
        send(commands, [(STOP,)])
        core.join(30)
    turns = [r.getMessage() for r in caplog.records if "engine core turn" in r.getMessage()]
    # 100 prompt tokens in chunks of at most 64, then one token per decode step: the first turn
    # also applied the ADD; the turn that took STOP ran no step.
    assert "1 commands applied" in turns[0] and "a step of 64 tokens" in turns[0]
    assert "a step of 36 tokens" in turns[1]
    assert all("a step of 1 tokens" in t for t in turns[2:-1])
    assert "a step of 0 tokens" in turns[-1] and "0 running, 0 waiting" in turns[-1]
