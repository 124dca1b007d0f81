"""The load generator reads a response's event stream a network chunk at a time and splits the
lines itself: however the bytes are cut into reads (mid-line, mid-character, a comment between
events, CRLF line ends, a last line without its newline), the request's record is the same."""
from __future__ import annotations

import asyncio
import socket
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("aiohttp")
from kvscope.bench.http_client import new_session, stream_request  # noqa: E402

STREAM = (
    'data: {"choices":[{"index":0,"text":"hé","finish_reason":null}]}\n\n'
    ": ping\n\n"
    'data: {"choices":[{"index":0,"text":"日本","finish_reason":null}]}\r\n\r\n'
    'data: {"choices":[{"index":0,"text":"","finish_reason":"length"}],'
    '"usage":{"prompt_tokens":3,"completion_tokens":2}}'  # no newline, no [DONE]: the stream's
).encode()  # end ends the line, as a line reader returns it


class _CutServer:
    """Answers each POST with ``STREAM`` written in the pieces ``cuts`` makes, 3 ms apart (so that
    each piece is a read of its own), then closes."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1/completions"
        self.cuts: list[int] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            conn, _ = self.sock.accept()
            with conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    data += conn.recv(65536)
                head, _, body = data.partition(b"\r\n\r\n")
                length = int(next(line.split(b":")[1] for line in head.lower().split(b"\r\n")
                                  if line.startswith(b"content-length:")))
                while len(body) < length:
                    body += conn.recv(65536)
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n")
                edges = [0, *sorted(set(self.cuts)), len(STREAM)]
                for a, b in zip(edges, edges[1:]):
                    conn.sendall(STREAM[a:b])
                    time.sleep(0.003)


@pytest.fixture(scope="module")
def server():
    return _CutServer()


async def _one(url: str):
    async with new_session() as session:
        return await stream_request(session, url, {"model": "m", "prompt": "x", "stream": True}, 10.0)


@settings(max_examples=25, deadline=None)
@given(cuts=st.lists(st.integers(1, len(STREAM) - 1), max_size=8))
def test_any_cut_of_the_stream_reads_the_same(server, cuts):
    server.cuts = cuts
    out = asyncio.run(_one(server.url))
    assert out.error is None
    assert out.text == "hé日本" and len(out.chunk_times) == 2
    assert out.finish_reason == "length" and out.output_tokens == 2 and out.prompt_tokens == 3
    assert out.chunk_times == sorted(out.chunk_times) and out.sent <= out.chunk_times[0] <= out.ended
