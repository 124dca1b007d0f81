"""``kvscope serve`` through the ``openai`` SDK (sync and async, streamed and not).

Each answer is checked against an independent in-process engine (``LLM.generate`` / ``LLM.chat``)
with the same model and greedy parameters: same text, same tokens (through their logprob
entries), same usage counts. Completions run on ``dummy:tiny-llama``; chat on SmolLM2-135M,
whose tokenizer has a chat template (the byte-level tokenizer of dummy models has none). Every
server runs its engine on a thread and, again, in a process of its own.
"""
from __future__ import annotations

import asyncio
from functools import partial

import httpx
import pytest
from serve_helpers import MODES, ServerThread, sdk_completion, served

from kvscope import LLM, SamplingParams
from kvscope.engine.outputs import RequestOutput

openai = pytest.importorskip("openai")

MODEL = "dummy:tiny-llama"
KV_MEMORY = 8 << 20
PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def reference() -> LLM:
    return LLM(MODEL, kv_memory_bytes=KV_MEMORY)


@pytest.fixture(scope="module", params=MODES)
def server(request: pytest.FixtureRequest):
    with ServerThread(served(request.param, partial(LLM, MODEL, kv_memory_bytes=KV_MEMORY))) as s:
        yield s


@pytest.fixture(scope="module")
def client(server: ServerThread):
    with openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="none", max_retries=0, timeout=60) as c:
        yield c


def _ref(llm: LLM, prompt: str, **params) -> RequestOutput:
    return llm.generate([prompt], SamplingParams(temperature=0.0, **params), use_tqdm=False)[0]


def _token_texts(llm: LLM, out: RequestOutput) -> list[str]:
    return [llm.tokenizer.decode([t], skip_special_tokens=False) for t in out.token_ids]


def test_models_and_health(server: ServerThread, client) -> None:
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(f"{server.base_url}/health").status_code == 200


def test_completion_matches_llm_generate(client, reference: LLM) -> None:
    expected = _ref(reference, PROMPT, max_tokens=12, ignore_eos=True, logprobs=True)
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, logprobs=0,
                                  extra_body={"ignore_eos": True})
    choice = r.choices[0]
    assert (choice.text, choice.finish_reason) == (expected.text, "length")
    assert choice.logprobs.tokens == _token_texts(reference, expected)
    assert choice.logprobs.token_logprobs == pytest.approx(expected.outputs[0].logprobs, abs=1e-4)
    assert choice.logprobs.top_logprobs is None
    n_prompt = len(expected.prompt_token_ids)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (n_prompt, 12, n_prompt + 12)
    # The same prompt as token ids.
    r = client.completions.create(model=MODEL, prompt=expected.prompt_token_ids, max_tokens=12, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].text == expected.text


def test_completion_stream_with_usage(client, reference: LLM) -> None:
    expected = _ref(reference, PROMPT, max_tokens=20, ignore_eos=True)
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=20, temperature=0, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    *body, last = chunks
    assert "".join(c.choices[0].text for c in body) == expected.text
    assert body[-1].choices[0].finish_reason == "length"
    assert all(c.usage is None for c in body)
    assert last.choices == [] and last.usage.completion_tokens == 20
    assert last.usage.prompt_tokens == len(expected.prompt_token_ids)


def test_tokens_without_text_still_get_chunks(client, reference: LLM) -> None:
    """Ids outside the byte-level vocabulary decode to no text; such tokens still get chunks, since a
    client counts a stream's tokens by its chunks (held back, a stream of them read as no token).
    Here at most 16 of the 40 tokens add text, so a stream of text chunks only would have at most
    one chunk more than those (the closing one). The server folds the steps a slow reader has not
    taken yet into one chunk, so the count is compared with that bound, not with 40: a loaded
    machine folded 41 chunks into 25 once."""
    expected = _ref(reference, PROMPT, max_tokens=40, ignore_eos=True)
    with_text = sum(reference.tokenizer.decode([t]) != "" for t in expected.token_ids)
    assert with_text <= 16  # the case under test occurs
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=40, temperature=0, stream=True,
                                            extra_body={"ignore_eos": True}))
    assert len(chunks) > with_text + 1
    assert "".join(c.choices[0].text for c in chunks) == expected.text


def test_async_client_concurrent_streamed_and_not(server: ServerThread, reference: LLM) -> None:
    prompts = [f"Question {i}: why?" for i in range(4)]
    expected = reference.generate(prompts, SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True),
                                  use_tqdm=False)

    async def main() -> list[str]:
        async with openai.AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key="none", max_retries=0) as c:
            return await asyncio.gather(*(sdk_completion(c, MODEL, prompts[i], stream=not i % 2) for i in range(4)))

    assert asyncio.run(main()) == [o.text for o in expected]


def test_stop_strings(client, reference: LLM) -> None:
    text = _ref(reference, PROMPT, max_tokens=40, ignore_eos=True).text
    stop = next(text[i : i + 2] for i in range(3, len(text) - 1) if "\ufffd" not in text[i : i + 2])
    cut = text[: text.index(stop)]
    assert _ref(reference, PROMPT, max_tokens=40, ignore_eos=True, stop=[stop]).text == cut
    stops = ["never in this text \x00", stop]
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=40, temperature=0, stop=stops,
                                  extra_body={"ignore_eos": True})
    assert (r.choices[0].text, r.choices[0].finish_reason) == (cut, "stop")
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=40, temperature=0, stop=stop,
                                            stream=True, extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks) == cut  # nothing past the stop string was ever sent
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_top_logprobs(client) -> None:
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == r.usage.completion_tokens
    for token, chosen, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert token in top and len(top) <= 4
        assert chosen == pytest.approx(max(top.values()), abs=1e-5)  # greedy picks the most likely
    assert lp.text_offset == sorted(lp.text_offset)


def test_batch_of_prompts_with_n(client, reference: LLM) -> None:
    prompts = ["First prompt", "Second, longer prompt"]
    expected = reference.generate(prompts, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True),
                                  use_tqdm=False)
    r = client.completions.create(model=MODEL, prompt=prompts, n=2, max_tokens=8, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert [c.text for c in r.choices] == [expected[0].text] * 2 + [expected[1].text] * 2
    assert r.usage.prompt_tokens == sum(len(o.prompt_token_ids) for o in expected)
    assert r.usage.completion_tokens == 4 * 8
    texts, reasons = ["" for _ in range(4)], [None] * 4
    for chunk in client.completions.create(model=MODEL, prompt=prompts, n=2, max_tokens=8, temperature=0,
                                           stream=True, extra_body={"ignore_eos": True}):
        (choice,) = chunk.choices
        texts[choice.index] += choice.text
        reasons[choice.index] = choice.finish_reason or reasons[choice.index]
    assert texts == [c.text for c in r.choices] and reasons == ["length"] * 4


def test_more_samples_than_a_batch_holds_is_refused(server: ServerThread) -> None:
    r = httpx.post(f"{server.base_url}/v1/completions", json={"model": MODEL, "prompt": "x", "n": 65})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n" and "--max-num-seqs (64)" in r.text


# ---- chat, on SmolLM2 ---------------------------------------------------------------------------------
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def chat_reference(smollm2) -> RequestOutput:
    llm = LLM("smollm2-135m", kv_memory_bytes=KV_MEMORY, loaded_model=smollm2)
    assert llm.tokenizer.has_chat_template
    return llm.chat(MESSAGES, SamplingParams(max_tokens=10, temperature=0.0, logprobs=True), use_tqdm=False)[0]


@pytest.fixture(scope="module", params=MODES)
def chat_server(request: pytest.FixtureRequest, smollm2, chat_reference):
    # The engine process loads the model itself, and sends the server its (HF) tokenizer.
    engine = (LLM("smollm2-135m", kv_memory_bytes=KV_MEMORY, loaded_model=smollm2) if request.param == "thread"
              else served("process", partial(LLM, "smollm2-135m", kv_memory_bytes=KV_MEMORY)))
    with ServerThread(engine) as s:
        yield s


@pytest.mark.slow
def test_chat_matches_llm_chat(chat_server: ServerThread, chat_reference: RequestOutput) -> None:
    with openai.OpenAI(base_url=f"{chat_server.base_url}/v1", api_key="none", max_retries=0) as c:
        r = c.chat.completions.create(model="smollm2-135m", messages=MESSAGES, max_tokens=10, temperature=0)
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == chat_reference.text
    assert choice.finish_reason == chat_reference.finish_reason
    assert r.usage.prompt_tokens == len(chat_reference.prompt_token_ids)
    assert r.usage.completion_tokens == len(chat_reference.token_ids)


@pytest.mark.slow
def test_chat_stream_async_with_logprobs(chat_server: ServerThread, chat_reference: RequestOutput) -> None:
    async def main() -> list:
        async with openai.AsyncOpenAI(base_url=f"{chat_server.base_url}/v1", api_key="none", max_retries=0) as c:
            stream = await c.chat.completions.create(
                model="smollm2-135m", messages=MESSAGES, max_tokens=10, temperature=0, stream=True,
                stream_options={"include_usage": True}, logprobs=True, top_logprobs=2)
            return [chunk async for chunk in stream]

    first, *body, last = asyncio.run(main())
    assert first.choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in body) == chat_reference.text
    assert body[-1].choices[0].finish_reason == chat_reference.finish_reason
    entries = [e for c in body if c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.logprob for e in entries] == pytest.approx(chat_reference.outputs[0].logprobs, abs=1e-4)
    assert all(len(e.top_logprobs) == 2 and e.top_logprobs[0].logprob == pytest.approx(e.logprob, abs=1e-5)
               for e in entries)
    assert last.choices == [] and last.usage.completion_tokens == len(chat_reference.token_ids)
