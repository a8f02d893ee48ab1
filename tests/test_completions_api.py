"""``POST /v1/completions`` (legacy text completions) over real HTTP with the openai SDK:
against the embedded llama.cpp model, against the scripted fake upstream on both
transports, and with memory, which a completion uses only when its body asks."""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from proxy.app import create_app
from proxy.backends.base import ChatBackend, Completion
from proxy.backends.llamacpp import LlamaCppBackend
from proxy.errors import InvalidRequestError
from proxy.testing.fake_upstream import DEFAULT_TEXT, FakeUpstream, Reply, Status, text_completion
from proxy.testing.live import Live, serve
from tests.conftest import api, sdk, upstream_settings

PROMPT = "The three primary colours are"
COUNT = "1, 2, 3, 4, 5,"


def client(live: Live) -> openai.OpenAI:
    return openai.OpenAI(base_url=live.base_url, api_key="unused", max_retries=0)


def backend(live: Live) -> LlamaCppBackend:
    b = live.context.backends["local"]
    assert isinstance(b, LlamaCppBackend)
    return b


def endless(b: LlamaCppBackend) -> dict[str, int]:
    """A logit_bias that bans every token that ends a text."""
    return {str(t): -100 for t in b.end_token_ids()}


def post(live: Live, body: dict[str, Any], **headers: str) -> httpx.Response:
    return httpx.post(f"{live.base_url}/completions", json=body, headers=headers, timeout=60)


# -- the local model --------------------------------------------------------------------


def test_local_completion_is_deterministic_and_openai_shaped(local_server: Live) -> None:
    c = client(local_server)
    raw = c.completions.with_raw_response.create(model="local", prompt=PROMPT, max_tokens=12,
                                                 temperature=0)
    reply = raw.parse()
    again = c.completions.create(model="local", prompt=PROMPT, max_tokens=12, temperature=0)
    assert reply.object == "text_completion"
    assert reply.id.startswith("cmpl-")
    assert reply.model == "local"
    assert len(reply.choices) == 1 and reply.choices[0].index == 0
    assert reply.choices[0].text and reply.choices[0].text == again.choices[0].text
    assert reply.choices[0].finish_reason in ("stop", "length")
    usage = reply.usage
    assert usage is not None and usage.prompt_tokens > 0 and usage.completion_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert raw.headers["x-memcube-activation"] == "none"
    assert raw.headers["x-memcube-memories"] == ""
    assert len(raw.headers["x-memcube-request-id"]) == 32


def test_local_max_tokens_ends_with_length(local_server: Live) -> None:
    b = backend(local_server)
    reply = client(local_server).completions.create(
        model="local", prompt=PROMPT, max_tokens=5, temperature=0, logit_bias=endless(b))
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage is not None and reply.usage.completion_tokens == 5


def test_local_default_max_tokens_is_openais_16(local_server: Live) -> None:
    b = backend(local_server)
    reply = client(local_server).completions.create(model="local", prompt=PROMPT, temperature=0,
                                                    logit_bias=endless(b))
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage is not None and reply.usage.completion_tokens == 16


def test_local_stop_cuts_the_text_before_it(local_server: Live) -> None:
    c = client(local_server)
    full = c.completions.create(model="local", prompt=COUNT, max_tokens=16,
                                temperature=0).choices[0].text
    assert "," in full, full  # the model goes on counting
    stopped = c.completions.create(model="local", prompt=COUNT, max_tokens=16, temperature=0,
                                   stop=[","])
    assert stopped.choices[0].text == full[:full.index(",")]
    assert stopped.choices[0].finish_reason == "stop"


def test_local_echo_puts_the_prompt_first(local_server: Live) -> None:
    c = client(local_server)
    plain = c.completions.create(model="local", prompt=PROMPT, max_tokens=8, temperature=0)
    echoed = c.completions.create(model="local", prompt=PROMPT, max_tokens=8, temperature=0,
                                  echo=True)
    assert echoed.choices[0].text == PROMPT + plain.choices[0].text
    chunks = list(c.completions.create(model="local", prompt=PROMPT, max_tokens=8,
                                       temperature=0, echo=True, stream=True))
    assert chunks[0].choices[0].text == PROMPT
    assert "".join(ch.choices[0].text for ch in chunks) == echoed.choices[0].text


def test_local_list_of_prompts_gives_a_choice_each(local_server: Live) -> None:
    c = client(local_server)
    prompts = [PROMPT, COUNT]
    alone = [c.completions.create(model="local", prompt=p, max_tokens=8,
                                  temperature=0).choices[0].text for p in prompts]
    both = c.completions.create(model="local", prompt=prompts, max_tokens=8, temperature=0)
    assert [ch.index for ch in both.choices] == [0, 1]
    assert [ch.text for ch in both.choices] == alone
    chunks = list(c.completions.create(model="local", prompt=prompts, max_tokens=8,
                                       temperature=0, stream=True))
    streamed = ["".join(ch.choices[0].text for ch in chunks if ch.choices[0].index == i)
                for i in (0, 1)]
    assert streamed == alone
    finishes = [ch.choices[0] for ch in chunks if ch.choices[0].finish_reason]
    assert [f.index for f in finishes] == [0, 1]


def test_local_stream_matches_non_stream_and_ends_with_usage(local_server: Live) -> None:
    c = client(local_server)
    whole = c.completions.create(model="local", prompt=PROMPT, max_tokens=12, temperature=0)
    chunks = list(c.completions.create(model="local", prompt=PROMPT, max_tokens=12,
                                       temperature=0, stream=True,
                                       stream_options={"include_usage": True}))
    assert all(ch.object == "text_completion" for ch in chunks)
    assert len({ch.id for ch in chunks}) == 1
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    assert text == whole.choices[0].text
    assert sum(1 for ch in chunks if ch.choices and ch.choices[0].text) > 3  # as made
    assert chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage


def test_local_stream_ends_with_done_on_the_wire(local_server: Live) -> None:
    body = {"model": "local", "prompt": PROMPT, "max_tokens": 4, "stream": True}
    with httpx.stream("POST", f"{local_server.base_url}/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        frames = [line for line in r.iter_lines() if line]
    assert frames[-1] == "data: [DONE]"
    assert json.loads(frames[-2][6:])["object"] == "text_completion"


async def test_local_async_client(local_server: Live) -> None:
    c = openai.AsyncOpenAI(base_url=local_server.base_url, api_key="unused", max_retries=0)
    reply = await c.completions.create(model="local", prompt=PROMPT, max_tokens=10,
                                       temperature=0)
    stream = await c.completions.create(model="local", prompt=PROMPT, max_tokens=10,
                                        temperature=0, stream=True)
    text = "".join([ch.choices[0].text async for ch in stream])
    assert text == reply.choices[0].text
    await c.close()


def test_local_seeded_sampling_repeats(local_server: Live) -> None:
    c = client(local_server)
    a, b = (c.completions.create(model="local", prompt=PROMPT, max_tokens=12, temperature=0.9,
                                 seed=7).choices[0].text for _ in range(2))
    assert a == b


def test_local_stream_disconnect_stops_generation(local_server: Live) -> None:
    b = backend(local_server)
    body = {"model": "local", "prompt": PROMPT, "max_tokens": 1500, "stream": True,
            "logit_bias": endless(b)}
    with httpx.stream("POST", f"{local_server.base_url}/completions", json=body) as r:
        lines = r.iter_lines()
        for _ in range(6):
            next(lines)
    local_server.call(b.idle())
    stats = b.last_generation
    assert stats is not None and stats.cancelled and stats.pieces < 1500


def test_local_non_stream_disconnect_stops_generation(local_server: Live) -> None:
    b = backend(local_server)
    body = {"model": "local", "prompt": PROMPT, "max_tokens": 1500, "logit_bias": endless(b)}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{local_server.base_url}/completions", json=body, timeout=0.5)
    local_server.call(b.idle())
    stats = b.last_generation
    assert stats is not None and stats.cancelled and stats.pieces < 1500


@pytest.mark.parametrize(("extra", "param"), [
    ({"n": 2}, "n"), ({"best_of": 3}, "best_of"), ({"logprobs": 2}, "logprobs"),
    ({"suffix": " and that is all."}, "suffix"), ({"prompt": [1, 2, 3]}, "prompt"),
    ({"prompt": [[1, 2], [3]]}, "prompt"),
])
@pytest.mark.parametrize("stream", [False, True])
def test_local_unsupported_features_are_400(local_server: Live, extra: dict[str, Any],
                                            param: str, stream: bool) -> None:
    r = post(local_server, {"model": "local", "prompt": PROMPT, "stream": stream, **extra})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error"
    assert "local model" in err["message"]


@pytest.mark.parametrize(("prompt", "param"), [("word " * 5000, "prompt"),
                                               ([PROMPT, "word " * 5000], "prompt.[1]")])
def test_local_prompt_over_the_context_is_400(local_server: Live, prompt: Any,
                                              param: str) -> None:
    r = post(local_server, {"model": "local", "prompt": prompt})
    assert r.status_code == 400
    err = r.json()["error"]
    assert (err["code"], err["param"]) == ("context_length_exceeded", param)
    assert "maximum context length is 2048 tokens" in err["message"]


@pytest.mark.parametrize(("body", "param", "says"), [
    ({"prompt": PROMPT}, "model", "Missing required parameter"),
    ({"model": "local"}, "prompt", "Missing required parameter"),
    ({"model": "nope", "prompt": PROMPT}, "model", "does not exist"),
    ({"model": "local", "prompt": 5}, "prompt", "valid string or a valid list"),
    ({"model": "local", "prompt": []}, "prompt", "at least 1 item"),
    ({"model": "local", "prompt": [PROMPT, 3]}, "prompt.[1]", "valid string"),
    ({"model": "local", "prompt": [-1]}, "prompt.[0]", "greater than or equal to 0"),
    ({"model": "local", "prompt": PROMPT, "max_tokens": 0}, "max_tokens", "greater than"),
    ({"model": "local", "prompt": PROMPT, "echo": "yes"}, "echo", "valid boolean"),
    ({"model": "local", "prompt": PROMPT, "n": 2, "best_of": 1}, "best_of", "best_of must be"),
    ({"model": "local", "prompt": PROMPT, "temperature": 3}, "temperature", "less than"),
    ({"model": "local", "prompt": PROMPT, "memory": {"recall": True}}, "memory.recall",
     "Extra inputs"),
    ({"model": "local", "prompt": [1, 2], "memory": {}}, "prompt", "Memory needs the prompt"),
])
def test_bad_completion_requests_name_the_field(local_server: Live, body: dict[str, Any],
                                                param: str, says: str) -> None:
    r = post(local_server, body)
    assert r.status_code in (400, 404), r.text
    err = r.json()["error"]
    assert err["param"] == param and says in err["message"], err


def test_only_post_is_served(local_server: Live) -> None:
    r = httpx.get(f"{local_server.base_url}/completions")
    assert r.status_code == 405
    assert r.json()["error"]["type"] == "invalid_request_error"


class ChatOnly(ChatBackend):
    """A backend that serves chat only, as a new provider module might."""

    async def complete(self, body: dict[str, Any], ctx: Any = None) -> Completion:
        return Completion(data={})

    async def stream(self, body: dict[str, Any],
                     ctx: Any = None) -> AsyncGenerator[dict[str, Any], None]:
        yield {}


async def test_a_backend_without_text_completions_refuses_them_clearly() -> None:
    backend = ChatOnly()
    with pytest.raises(InvalidRequestError) as plain:
        await backend.text_complete({"model": "chatty", "prompt": "hi"})
    with pytest.raises(InvalidRequestError) as streamed:
        await backend.text_stream_events({"model": "chatty", "prompt": "hi"}).__anext__()
    for refused in (plain.value, streamed.value):
        assert (refused.status, refused.param) == (400, "model")
        assert "The model 'chatty' does not serve /v1/completions" in refused.message


# -- upstream models ----------------------------------------------------------------------


@pytest.fixture(params=["direct", "litellm"])
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def proxy(tmp_path: Path, upstream: FakeUpstream, transport: str,
          monkeypatch: pytest.MonkeyPatch) -> Iterator[Live]:
    monkeypatch.setenv("FAKE_UPSTREAM_KEY", "sk-upstream-secret")
    with serve(create_app(upstream_settings(tmp_path, upstream, transport))) as live:
        yield live


def test_upstream_completion_is_relayed(proxy: Live, upstream: FakeUpstream,
                                        transport: str) -> None:
    upstream.enqueue(Reply(text_completion(["the answer"])))
    raw = client(proxy).completions.with_raw_response.create(
        model="up", prompt="Say it:", max_tokens=7, temperature=0.5, stop=["\n"], seed=3)
    reply = raw.parse()
    assert reply.choices[0].text == "the answer"
    assert reply.usage is not None and reply.usage.total_tokens == 12
    sent = upstream.history[-1]
    assert sent.path == "/v1/completions"
    assert sent.headers["authorization"] == "Bearer sk-upstream-secret"
    assert sent.body["model"] == "fake-model"
    for key, value in {"prompt": "Say it:", "max_tokens": 7, "temperature": 0.5,
                       "stop": ["\n"], "seed": 3}.items():
        assert sent.body[key] == value, key
    assert reply.model == "up"  # the name the client sent; the upstream's in a header
    assert raw.headers["x-memcube-upstream-model"] == "fake-model"
    if transport == "direct":  # only the model rewritten; the upstream's bytes, as they were
        assert sent.body == {"model": "fake-model", "prompt": "Say it:", "max_tokens": 7,
                             "temperature": 0.5, "stop": ["\n"], "seed": 3}
        assert raw.http_response.content == json.dumps(
            text_completion(["the answer"], model="up")).encode()


def test_upstream_stream_is_relayed(proxy: Live, upstream: FakeUpstream) -> None:
    chunks = list(client(proxy).completions.create(model="up", prompt="hi", stream=True))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == DEFAULT_TEXT
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert upstream.history[-1].body["stream"] is True


async def test_upstream_async_client_and_list_of_prompts(proxy: Live, upstream: FakeUpstream,
                                                         transport: str) -> None:
    c = openai.AsyncOpenAI(base_url=proxy.base_url, api_key="unused", max_retries=0)
    reply = await c.completions.create(model="up", prompt=["a", "b"])
    assert [(ch.index, ch.text) for ch in reply.choices] == [(0, DEFAULT_TEXT), (1, DEFAULT_TEXT)]
    assert upstream.history[-1].body["prompt"] == ["a", "b"]
    if transport == "litellm":  # its text streams number every choice 0: refused up front
        calls = len(upstream.history)
        with pytest.raises(openai.BadRequestError) as refused:
            await c.completions.create(model="up", prompt=["a", "b"], stream=True)
        assert refused.value.body["param"] == "prompt"  # type: ignore[index]
        assert len(upstream.history) == calls
        await c.close()
        return
    stream = await c.completions.create(model="up", prompt=["a", "b"], stream=True)
    texts: dict[int, str] = {0: "", 1: ""}
    async for ch in stream:
        for choice in ch.choices:
            texts[choice.index] += choice.text
    assert texts == {0: DEFAULT_TEXT, 1: DEFAULT_TEXT}
    await c.close()


def test_upstream_gets_what_the_local_model_refuses(proxy: Live, upstream: FakeUpstream) -> None:
    body = {"model": "up", "prompt": [[1, 2, 3]], "n": 2, "best_of": 3, "logprobs": 1,
            "suffix": "end", "echo": True, "my_vendor_flag": {"x": [1]}, "memory": None}
    r = post(proxy, body)
    assert r.status_code == 200, r.text
    sent = upstream.history[-1].body
    for key in ("prompt", "n", "best_of", "logprobs", "suffix", "echo", "my_vendor_flag"):
        assert sent[key] == body[key], key
    assert "memory" not in sent


@pytest.mark.parametrize("status", [400, 404, 429])
def test_upstream_4xx_keeps_status(proxy: Live, upstream: FakeUpstream, status: int) -> None:
    upstream.enqueue(Status(status, "upstream says no"))
    r = post(proxy, {"model": "up", "prompt": "hi"})
    assert r.status_code == status
    assert "upstream says no" in r.json()["error"]["message"]


def test_upstream_5xx_is_502(proxy: Live, upstream: FakeUpstream) -> None:
    upstream.enqueue(Status(500))
    r = post(proxy, {"model": "up", "prompt": "hi"})
    assert r.status_code == 502 and r.json()["error"]["type"] == "api_error"


# -- memory: only when the body asks for it ------------------------------------------------


FACT = "My cat is called Biscuit and she is ginger."
QUESTION = "Q: What is my cat called?\nA:"


def tell(live: Live) -> None:
    """Tell a fact through chat and wait until it is written back."""
    sdk(live).chat.completions.create(model="up", messages=[{"role": "user", "content": FACT}])
    assert api(live, "POST", "/memories/flush").json()["flushed"] is True


def memories(live: Live) -> list[str]:
    assert api(live, "POST", "/memories/flush").json()["flushed"] is True
    return sorted(m["text"] for m in api(live, "GET", "/memories?limit=100").json()["data"])


def test_completion_without_memory_object_neither_recalls_nor_writes(
        memory_live: Live, upstream: FakeUpstream) -> None:
    tell(memory_live)
    raw = sdk(memory_live).completions.with_raw_response.create(model="up", prompt=QUESTION)
    assert upstream.history[-1].body["prompt"] == QUESTION  # exactly the client's
    assert raw.headers["x-memcube-memories"] == ""
    assert memories(memory_live) == [FACT]  # the question was not remembered


def test_completion_with_memory_recalls_a_fact_told_through_chat(
        memory_live: Live, upstream: FakeUpstream) -> None:
    tell(memory_live)
    raw = sdk(memory_live).completions.with_raw_response.create(
        model="up", prompt=QUESTION, extra_body={"memory": {}})
    sent = upstream.history[-1].body
    assert "memory" not in sent
    prompt = sent["prompt"]
    assert prompt.startswith("<memories>") and prompt.endswith("</memories>\n\n" + QUESTION)
    assert FACT in prompt
    ids = raw.headers["x-memcube-memories"].split(",")
    assert [api(memory_live, "GET", f"/memories/{i}").json()["text"] for i in ids] == [FACT]
    assert raw.parse().choices[0].text == DEFAULT_TEXT
    assert memories(memory_live) == sorted([FACT, QUESTION])  # the prompt, as a user turn


def test_streamed_completion_with_memory(memory_live: Live, upstream: FakeUpstream) -> None:
    tell(memory_live)
    stream = sdk(memory_live).completions.create(model="up", prompt=QUESTION, stream=True,
                                                 extra_body={"memory": {"write": False}})
    assert "".join(ch.choices[0].text for ch in stream) == DEFAULT_TEXT
    assert FACT in upstream.history[-1].body["prompt"]
    assert memories(memory_live) == [FACT]  # write: false


def test_echo_with_memory_shows_the_clients_prompt_not_the_memories(
        memory_live: Live, upstream: FakeUpstream) -> None:
    tell(memory_live)
    c = sdk(memory_live)
    reply = c.completions.create(model="up", prompt=QUESTION, echo=True,
                                 extra_body={"memory": {"write": False}})
    assert reply.choices[0].text == QUESTION + DEFAULT_TEXT
    assert upstream.history[-1].body["echo"] is False  # the proxy echoes, not the upstream
    stream = c.completions.create(model="up", prompt=QUESTION, echo=True, stream=True,
                                  extra_body={"memory": {"write": False}})
    assert "".join(ch.choices[0].text for ch in stream) == QUESTION + DEFAULT_TEXT


def test_memory_of_other_users_stays_out(memory_live: Live, upstream: FakeUpstream) -> None:
    tell(memory_live)
    sdk(memory_live, "acme", "bob").completions.create(model="up", prompt=QUESTION,
                                                      extra_body={"memory": {"write": False}})
    assert "Biscuit" not in upstream.history[-1].body["prompt"]
