"""``/v1/responses`` on the embedded model (real llama.cpp): the same answer as chat
at temperature 0, streamed or not, and the cube's activation state shared with chat."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from proxy.app import create_app
from proxy.settings import (
    ActivationSettings,
    AuthSettings,
    EmbedderSettings,
    MemorySettings,
    ModelConfig,
    Settings,
    TenantConfig,
)
from proxy.testing.live import Live, serve

QUESTION = "What do I like to drink?"
NO_WRITE = {"memory": {"write": False}}


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Iterator[Live]:
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("responses-local"),
        models=[ModelConfig(name="local", backend="llamacpp", n_ctx=2048)],
        auth=AuthSettings(enabled=True),
        tenants=[TenantConfig(id="acme", api_keys=["sk-acme"])],
        memory=MemorySettings(embedder=EmbedderSettings(cache_dir=model_cache)),
        activation=ActivationSettings(refresh_seconds=3600),
    )
    with serve(create_app(settings)) as running:
        yield running


def client(live: Live, user: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=live.base_url, api_key="sk-acme", max_retries=0,
                         default_headers={"x-memcube-user": user})


def chat(live: Live, user: str) -> tuple[str, Any]:
    raw = client(live, user).chat.completions.with_raw_response.create(
        model="local", messages=[{"role": "user", "content": QUESTION}], max_tokens=16,
        temperature=0, extra_body=NO_WRITE)
    return raw.parse().choices[0].message.content or "", raw.headers


def respond(live: Live, user: str, **extra: Any) -> tuple[Any, Any]:
    kwargs: dict[str, Any] = {"max_output_tokens": 16, **extra}
    raw = client(live, user).responses.with_raw_response.create(
        model="local", input=QUESTION, temperature=0, extra_body=NO_WRITE, **kwargs)
    return raw.parse(), raw.headers


def test_same_answer_as_chat_and_the_activation_state_is_shared(live: Live) -> None:
    r = httpx.post(f"{live.base_url}/memories", headers={"authorization": "Bearer sk-acme"},
                   json={"user": "ann", "text": "The user drinks green tea.", "pinned": True},
                   timeout=60)
    assert r.status_code == 200, r.text
    text, h1 = chat(live, "ann")
    response, h2 = respond(live, "ann")
    assert (h1["x-memcube-activation"], h2["x-memcube-activation"]) == ("miss", "hit")
    assert r.json()["id"] in h2["x-memcube-memories"].split(",")
    assert text and response.output_text == text
    assert response.usage.output_tokens > 0 and response.usage.input_tokens > 0


def test_stream_gives_the_same_text(live: Live) -> None:
    response, _ = respond(live, "bo")
    with client(live, "bo").responses.stream(
            model="local", input=QUESTION, max_output_tokens=16, temperature=0,
            extra_body=NO_WRITE) as stream:
        events = list(stream)
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    # Cut at 16 tokens, OpenAI ends with response.incomplete (else response.completed).
    last = events[-1]
    assert last.type == f"response.{response.status}"
    assert "".join(deltas) == last.response.output_text == response.output_text


def test_cut_at_max_output_tokens_is_incomplete(live: Live) -> None:
    response, _ = respond(live, "cy", max_output_tokens=1)
    assert response.status == "incomplete"
    assert response.incomplete_details.reason == "max_output_tokens"


def test_continuation_on_the_local_model(live: Live) -> None:
    c = client(live, "di")
    first = c.responses.create(model="local", input="My name is Ada.", max_output_tokens=8,
                               temperature=0, extra_body=NO_WRITE)
    second = c.responses.create(model="local", input="What is my name?", max_output_tokens=8,
                                temperature=0, previous_response_id=first.id,
                                extra_body=NO_WRITE)
    assert second.previous_response_id == first.id and second.output_text
    items = list(c.responses.input_items.list(second.id))
    assert [i.content[0].text for i in items] == ["What is my name?"]  # type: ignore[union-attr]


def test_function_tools_are_refused_by_the_local_model(live: Live) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        client(live, "ed").responses.create(
            model="local", input="hi", tools=[{"type": "function", "name": "f",
                                               "parameters": {"type": "object"}}])
    assert exc.value.body["param"] == "tools"  # type: ignore[index]
