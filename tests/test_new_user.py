"""What a new user tripped over (issue 20), end to end: memory switched off stores
nothing, anonymous requests share nothing, lists hide deleted memories, an admin is
told to name a tenant, a memory already in the request is not injected again,
replies carry the model name the client sent, cubes copy under a new id, and a
request's injected memory text can be read back (``X-Memcube-Debug``).

Real HTTP, the real MiniLM, Qdrant Edge on disk, the scripted fake upstream, and the
official openai SDK as the client.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from proxy.app import create_app
from proxy.testing.fake_upstream import FakeUpstream
from proxy.testing.live import Live, serve
from tests.conftest import ADMIN_KEY, KEYS, api, memory_settings, sdk


@pytest.fixture
def live(memory_live: Live) -> Live:
    return memory_live


def flush(live: Live, tenant: str = "acme") -> None:
    assert api(live, "POST", "/memories/flush", tenant).json()["flushed"] is True


def texts(live: Live, user: str | None = None, tenant: str = "acme",
          status: str = "all") -> list[str]:
    params = {"status": status, "limit": 1000, **({"user": user} if user else {})}
    return sorted(m["text"] for m in api(live, "GET", "/memories", tenant,
                                         params=params).json()["data"])


def system_text(upstream: FakeUpstream) -> str:
    return "\n".join(str(m["content"]) for m in upstream.history[-1].body["messages"]
                     if m["role"] == "system")


def anonymous_sdk(live: Live, tenant: str = "acme") -> openai.OpenAI:
    """The SDK as a client that names no user: no header, no body ``user``."""
    return openai.OpenAI(base_url=live.base_url, api_key=KEYS[tenant], max_retries=0)


# -- 1. memory: {enabled, write} -----------------------------------------------------

@pytest.mark.parametrize(("memory", "recalls", "writes", "mode"), [
    (None, True, True, "on"),
    ({"enabled": True}, True, True, "on"),
    ({"enabled": False}, False, False, "off"),
    ({"enabled": False, "write": True}, False, True, "write-only"),
    ({"enabled": True, "write": False}, True, False, "recall-only"),
    ({"enabled": False, "write": False}, False, False, "off"),
    ({"write": False}, True, False, "recall-only"),
])
def test_enabled_and_write_each_combination(live: Live, upstream: FakeUpstream,
                                            memory: dict[str, Any] | None, recalls: bool,
                                            writes: bool, mode: str) -> None:
    api(live, "POST", "/memories", json={"user": "alice", "text": "The blue house is for sale."})
    secret = "Secret plan: buy the blue house before Friday."
    extra = {"extra_body": {"memory": memory}} if memory is not None else {}
    raw = sdk(live).with_raw_response.chat.completions.create(
        model="up", messages=[{"role": "user", "content": secret}], **extra)
    assert raw.headers["x-memcube-memory"] == mode
    assert ("The blue house is for sale." in system_text(upstream)) is recalls
    flush(live)
    assert (secret in texts(live, "alice")) is writes


# -- 2. anonymous requests -----------------------------------------------------------

def test_a_request_naming_no_user_neither_reads_nor_writes_anyones_memory(
        live: Live, upstream: FakeUpstream) -> None:
    # What an earlier anonymous client would have stored, under the stand-in user.
    api(live, "POST", "/memories", json={"user": "default", "text": "My PIN hint is my cat."})
    raw = anonymous_sdk(live).with_raw_response.chat.completions.create(
        model="up", messages=[{"role": "user", "content": "I am moving to Lisbon in May."}])
    assert raw.headers["x-memcube-memory"] == "anonymous"
    assert raw.headers["x-memcube-memories"] == ""
    assert "PIN hint" not in system_text(upstream)
    assert "<memories>" not in system_text(upstream)
    flush(live)
    assert texts(live) == ["My PIN hint is my cat."]  # the anonymous turn was not kept
    health = httpx.get(f"{live.url}/healthz").json()
    assert health["memory"]["anonymous"] == "off"


def test_an_anonymous_request_still_reads_a_cube_it_mounts(live: Live,
                                                           upstream: FakeUpstream) -> None:
    assert api(live, "POST", "/cubes", json={"name": "kb", "id": "kb"}).status_code == 200
    api(live, "POST", "/memories", json={"text": "The office opens at 8am.", "cube_id": "kb"})
    anonymous_sdk(live).chat.completions.create(
        model="up", messages=[{"role": "user", "content": "When does the office open?"}],
        extra_body={"memory": {"cubes": ["kb"]}})
    assert "The office opens at 8am." in system_text(upstream)
    # It wrote nowhere: it named no user and no write cube.
    flush(live)
    assert texts(live) == ["The office opens at 8am."]


@pytest.fixture
def shared_live(tmp_path: Path, upstream: FakeUpstream, model_cache: Path) -> Iterator[Live]:
    settings = memory_settings(tmp_path, upstream, model_cache, anonymous="shared")
    with serve(create_app(settings)) as server:
        yield server


def test_anonymous_shared_is_a_deliberate_choice(shared_live: Live,
                                                 upstream: FakeUpstream) -> None:
    live = shared_live
    raw = anonymous_sdk(live).with_raw_response.chat.completions.create(
        model="up", messages=[{"role": "user", "content": "My locker number is 4411."}])
    assert raw.headers["x-memcube-memory"] == "on"
    flush(live)
    assert texts(live, "default") == ["My locker number is 4411."]
    anonymous_sdk(live).chat.completions.create(
        model="up", messages=[{"role": "user", "content": "What is my locker number?"}])
    assert "4411" in system_text(upstream)
    assert httpx.get(f"{live.url}/healthz").json()["memory"]["anonymous"] == "shared"


# -- 5, 6. the memory list -------------------------------------------------------------

def test_the_list_shows_active_memories_unless_asked(live: Live) -> None:
    kept = api(live, "POST", "/memories", json={"user": "alice", "text": "I like figs."})
    gone = api(live, "POST", "/memories", json={"user": "alice", "text": "I like plums."})
    assert api(live, "DELETE", f"/memories/{gone.json()['id']}").status_code == 200
    listed = api(live, "GET", "/memories").json()["data"]
    assert [m["id"] for m in listed] == [kept.json()["id"]]
    assert texts(live, status="deleted") == ["I like plums."]
    assert texts(live, status="all") == ["I like figs.", "I like plums."]


def test_an_admin_key_must_name_the_tenant(live: Live) -> None:
    api(live, "POST", "/memories", json={"user": "alice", "text": "I like figs."})
    admin = {"authorization": f"Bearer {ADMIN_KEY}"}
    for path in ("/memories", "/cubes"):
        r = httpx.get(f"{live.base_url}{path}", headers=admin)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == "X-Memcube-Tenant"
    r = httpx.get(f"{live.base_url}/memories", headers={**admin, "x-memcube-tenant": "acme"})
    assert [m["text"] for m in r.json()["data"]] == ["I like figs."]


# -- 7. what the request already holds -------------------------------------------------

def test_a_memory_already_in_the_conversation_is_not_injected(
        live: Live, upstream: FakeUpstream) -> None:
    turns = ["My sister Ofelia lives in Porto.", "Ofelia works as a marine biologist."]
    history: list[dict[str, str]] = []
    for turn in turns:
        history.append({"role": "user", "content": turn})
        reply = sdk(live).chat.completions.create(model="up", messages=history)  # type: ignore[arg-type]
        history.append({"role": "assistant", "content": reply.choices[0].message.content or ""})
        flush(live)
    # The third turn of the same conversation: both facts are stored and both are in
    # the messages already, so neither is injected again.
    history.append({"role": "user", "content": "Where does Ofelia live and what is her job?"})
    raw = sdk(live).with_raw_response.chat.completions.create(
        model="up", messages=history)  # type: ignore[arg-type]
    assert raw.headers["x-memcube-memories"] == ""
    assert "<memories>" not in system_text(upstream)
    # A new conversation does get them.
    raw = sdk(live).with_raw_response.chat.completions.create(
        model="up", messages=[{"role": "user", "content": "Where does Ofelia live?"}])
    assert "Ofelia lives in Porto." in system_text(upstream)


def test_a_question_asked_again_is_not_injected_as_a_memory(
        live: Live, upstream: FakeUpstream) -> None:
    question = "What is the capital of Australia?"
    sdk(live).chat.completions.create(model="up", messages=[{"role": "user", "content": question}])
    flush(live)
    assert question in texts(live, "alice")
    raw = sdk(live).with_raw_response.chat.completions.create(
        model="up", messages=[{"role": "user", "content": question}])
    assert question not in system_text(upstream)
    assert raw.headers["x-memcube-memories"] == ""


# -- 10. the model name ------------------------------------------------------------------

def test_replies_name_the_model_the_client_sent(live: Live) -> None:
    raw = sdk(live).with_raw_response.chat.completions.create(
        model="up", messages=[{"role": "user", "content": "Hello there, how are you?"}])
    assert raw.parse().model == "up"
    assert raw.headers["x-memcube-upstream-model"] == "fake-model"
    with sdk(live).with_streaming_response.chat.completions.create(
            model="up", stream=True,
            messages=[{"role": "user", "content": "Hello again, how are you?"}]) as stream:
        assert stream.headers["x-memcube-upstream-model"] == "fake-model"
        chunks = list(stream.parse())
    assert chunks and {c.model for c in chunks} == {"up"}
    embedded = sdk(live).with_raw_response.embeddings.create(model="up", input=["a", "b"])
    assert embedded.parse().model == "up"
    assert embedded.headers["x-memcube-upstream-model"] == "fake-model"


# -- README: copy a cube under a new id ------------------------------------------------

def test_a_cube_is_copied_under_a_new_id(live: Live) -> None:
    assert api(live, "POST", "/cubes", json={"name": "kb", "id": "kb"}).status_code == 200
    made = api(live, "POST", "/memories", json={"text": "Deploys happen on Tuesdays.",
                                                "cube_id": "kb"}).json()
    api(live, "PATCH", f"/memories/{made['id']}", json={"text": "Deploys happen on Thursdays."})
    export = api(live, "GET", "/cubes/kb/export").text
    same = api(live, "POST", "/cubes/import?id=kb", content=export)
    assert same.status_code == 200 and same.json()["id"] == "kb"
    copied = api(live, "POST", "/cubes/import?id=kb-copy", content=export)
    assert copied.status_code == 200, copied.text
    assert copied.json()["id"] == "kb-copy" and copied.json()["imported"] == 1
    assert copied.json()["kind"] == "shared"
    again = api(live, "POST", "/cubes/import?id=kb-copy", content=export)
    assert again.json()["imported"] == 1
    cube = api(live, "GET", "/cubes/kb-copy").json()
    assert cube["memories"] == 1
    listed = api(live, "GET", "/memories", params={"cube_id": "kb-copy"}).json()["data"]
    assert [(m["text"], m["version"]) for m in listed] == [("Deploys happen on Thursdays.", 2)]
    assert listed[0]["id"] != made["id"]
    history = api(live, "GET", f"/memories/{listed[0]['id']}/history").json()["data"]
    assert [v["text"] for v in history] == ["Deploys happen on Tuesdays.",  # oldest first
                                            "Deploys happen on Thursdays."]
    # The original is untouched.
    original = api(live, "GET", "/memories", params={"cube_id": "kb"}).json()["data"]
    assert [m["id"] for m in original] == [made["id"]]
    bad = api(live, "POST", "/cubes/import?id=no%20spaces", content=export)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "id"


# -- README: what the model saw --------------------------------------------------------

def test_a_debug_request_leaves_a_record_of_its_injected_block(
        live: Live, upstream: FakeUpstream) -> None:
    api(live, "POST", "/memories", json={"user": "alice", "text": "My dog is called Rex."})
    raw = sdk(live).with_raw_response.chat.completions.create(
        model="up", messages=[{"role": "user", "content": "What is my dog called?"}],
        extra_headers={"x-memcube-debug": "1"})
    rid = raw.headers["x-memcube-request-id"]
    record = api(live, "GET", f"/requests/{rid}")
    assert record.status_code == 200, record.text
    body = record.json()
    assert body["id"] == rid and body["object"] == "memcube.request"
    assert body["user"] == "alice" and body["memory"] == "on" and body["model"] == "up"
    assert body["memories"] == raw.headers["x-memcube-memories"].split(",")
    # The exact text the model received.
    assert body["block"] is not None and body["block"] in system_text(upstream)
    assert "My dog is called Rex." in body["block"]
    # Only its tenant (or an admin) reads it.
    assert api(live, "GET", f"/requests/{rid}", "globex").status_code == 404
    admin = httpx.get(f"{live.base_url}/requests/{rid}",
                      headers={"authorization": f"Bearer {ADMIN_KEY}"})
    assert admin.status_code == 200 and json.loads(admin.text)["id"] == rid
    # Nothing is kept for a request that did not ask.
    plain = sdk(live).with_raw_response.chat.completions.create(
        model="up", messages=[{"role": "user", "content": "What is my dog called?"}])
    missing = api(live, "GET", f"/requests/{plain.headers['x-memcube-request-id']}")
    assert missing.status_code == 404
    assert "X-Memcube-Debug" in missing.json()["error"]["message"]


def test_the_interactive_api_docs_are_served(live: Live) -> None:
    docs = httpx.get(f"{live.url}/docs")
    assert docs.status_code == 200 and "swagger-ui" in docs.text
    schema = httpx.get(f"{live.url}/openapi.json").json()
    assert "/v1/memories" in schema["paths"] and "/v1/requests/{request_id}" in schema["paths"]
