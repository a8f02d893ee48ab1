"""Memory end to end: real HTTP, the real MiniLM embedder, real Qdrant Edge on disk,
the scripted fake upstream, and the official openai SDK as the client."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from proxy.testing.fake_upstream import FakeUpstream
from proxy.testing.live import Live
from tests.conftest import ADMIN_KEY, api, sdk


@pytest.fixture
def live(memory_live: Live) -> Live:
    return memory_live


def flush(live: Live, tenant: str = "acme") -> None:
    assert api(live, "POST", "/memories/flush", tenant).json()["flushed"] is True


def system_content(upstream: FakeUpstream) -> str:
    first = upstream.history[-1].body["messages"][0]
    return str(first["content"]) if first["role"] == "system" else ""


def test_fact_told_once_reaches_a_new_conversation(live: Live, upstream: FakeUpstream) -> None:
    sdk(live).chat.completions.create(
        model="up", messages=[{"role": "user", "content": "My sister Ofelia lives in Porto."}])
    flush(live)
    raw = sdk(live).with_raw_response.chat.completions.create(
        model="up", messages=[{"role": "user", "content": "Where does my sister live?"}])
    assert "Ofelia lives in Porto" in system_content(upstream)
    assert "<memories>" in system_content(upstream)
    ids = raw.headers["x-memcube-memories"].split(",")
    assert len(ids) == 1
    item = api(live, "GET", f"/memories/{ids[0]}").json()
    assert item["object"] == "memory"
    assert item["text"] == "My sister Ofelia lives in Porto."
    assert item["user"] == "alice"
    assert item["sources"][0]["request_id"] == upstream_request_id(live, item)
    assert set(item) >= {"id", "object", "cube_id", "user", "text", "type", "tags", "pinned",
                         "status", "version", "created_at", "updated_at", "sources"}


def upstream_request_id(live: Live, item: dict[str, Any]) -> str:
    # The provenance names the request the user turn came in on.
    rid = item["sources"][0]["request_id"]
    assert isinstance(rid, str) and len(rid) == 32
    return rid


def test_streamed_exchange_is_remembered(live: Live, upstream: FakeUpstream) -> None:
    stream = sdk(live).chat.completions.create(
        model="up", stream=True,
        messages=[{"role": "user", "content": "My favourite tree is the cork oak."}])
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    flush(live)
    sdk(live).chat.completions.create(
        model="up", messages=[{"role": "user", "content": "Which tree do I like best?"}])
    assert "cork oak" in system_content(upstream)


def test_users_and_tenants_do_not_see_each_other(live: Live, upstream: FakeUpstream) -> None:
    sdk(live).chat.completions.create(
        model="up", messages=[{"role": "user", "content": "The vault code word is heliotrope."}])
    flush(live)
    for tenant, user in (("acme", "bob"), ("globex", "alice")):
        sdk(live, tenant, user).chat.completions.create(
            model="up", messages=[{"role": "user", "content": "What is the vault code word?"}])
        assert "heliotrope" not in system_content(upstream)
    # Each of them sees only their own question, never alice's answer.
    for tenant, user in (("acme", "bob"), ("globex", "alice")):
        found = api(live, "POST", "/memories/search", tenant,
                    json={"query": "vault code word heliotrope", "user": user}).json()["data"]
        assert [m["text"] for m in found] == ["What is the vault code word?"]
    mine = api(live, "POST", "/memories/search", json={"query": "vault code word heliotrope",
                                                       "user": "alice"}).json()["data"]
    assert [m["text"] for m in mine] == ["The vault code word is heliotrope."]


def test_memory_write_false_and_enabled_false(live: Live, upstream: FakeUpstream) -> None:
    sdk(live).chat.completions.create(
        model="up", messages=[{"role": "user", "content": "Remember nothing of quince jam."}],
        extra_body={"memory": {"write": False}})
    flush(live)
    assert api(live, "GET", "/memories").json()["data"] == []
    api(live, "POST", "/memories", json={"text": "I adore quince jam", "user": "alice"})
    sdk(live).chat.completions.create(
        model="up", messages=[{"role": "user", "content": "quince jam?"}],
        extra_body={"memory": {"enabled": False}})
    assert "quince" not in system_content(upstream)


def test_memory_crud_versions_and_list_shapes(live: Live) -> None:
    made = api(live, "POST", "/memories",
               json={"text": "I like tea", "user": "alice", "tags": ["drinks"]}).json()
    assert made["version"] == 1 and made["tags"] == ["drinks"]
    patched = api(live, "PATCH", f"/memories/{made['id']}",
                  json={"text": "I like green tea", "pinned": True}).json()
    assert (patched["version"], patched["pinned"]) == (2, True)
    history = api(live, "GET", f"/memories/{made['id']}/history").json()
    assert history["object"] == "list" and history["has_more"] is False
    assert [v["text"] for v in history["data"]] == ["I like tea", "I like green tea"]
    found = api(live, "POST", "/memories/search",
                json={"query": "green tea", "user": "alice"}).json()
    assert found["data"][0]["id"] == made["id"] and isinstance(found["data"][0]["score"], float)
    deleted = api(live, "DELETE", f"/memories/{made['id']}").json()
    assert deleted == {"id": made["id"], "object": "memory.deleted", "deleted": True,
                       "version": 3}
    assert api(live, "POST", "/memories/search", json={"query": "green tea"}).json()["data"] == []
    listed = api(live, "GET", "/memories", params={"status": "deleted"}).json()
    assert [m["id"] for m in listed["data"]] == [made["id"]]


def test_memory_context_is_stored_searched_and_kept_across_versions(live: Live) -> None:
    made = api(live, "POST", "/memories", json={
        "text": "Yes, the blue one", "user": "alice",
        "context": "Did you end up buying the Brompton bicycle?"}).json()
    assert made["context"] == "Did you end up buying the Brompton bicycle?"
    found = api(live, "POST", "/memories/search",
                json={"query": "Brompton", "user": "alice"}).json()["data"]
    assert [m["id"] for m in found] == [made["id"]]
    patched = api(live, "PATCH", f"/memories/{made['id']}", json={"tags": ["bike"]}).json()
    assert patched["context"] == made["context"]
    plain = api(live, "POST", "/memories", json={"text": "no context here"}).json()
    assert plain["context"] is None


def test_memory_list_pages(live: Live) -> None:
    api(live, "POST", "/memories", json={"items": [
        {"text": f"note {i}", "user": "alice"} for i in range(5)]})
    seen: list[str] = []
    after = None
    while True:
        page = api(live, "GET", "/memories",
                   params={"limit": 2, **({"after": after} if after else {})}).json()
        seen += [m["id"] for m in page["data"]]
        if not page["has_more"]:
            break
        after = page["next_after"]
    assert len(seen) == len(set(seen)) == 5


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "param"),
    [("GET", "/memories/nope", None, 404, None),
     ("PATCH", "/memories/nope", {"text": "x"}, 404, None),
     ("POST", "/memories", {"user": "a"}, 400, "text"),
     ("POST", "/memories", {"text": ""}, 400, "text"),
     ("POST", "/memories", {"text": "x", "type": "gossip"}, 400, "type"),
     ("POST", "/memories", {"text": "x", "context": 5}, 400, "context"),
     ("POST", "/memories/search", {"query": "x", "top_k": 0}, 400, "top_k"),
     ("POST", "/cubes/nope/merge", {"source": "other"}, 404, None),
     ("POST", "/memories", {"items": [{"text": "x", "cube_id": "missing"}]}, 404, None),
     ("GET", "/memories", None, 400, "limit"),
     ("GET", "/memories?after=not-a-cursor", None, 400, "after")],
)
def test_bad_memory_requests_get_error_objects(live: Live, method: str, path: str,
                                               body: dict[str, Any] | None, status: int,
                                               param: str | None) -> None:
    params = {"limit": 0} if param == "limit" else None
    r = api(live, method, path, json=body, params=params)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    if param:
        assert err["param"] == param


def test_cubes_mount_export_import_merge(live: Live, upstream: FakeUpstream) -> None:
    cube = api(live, "POST", "/cubes", json={"name": "handbook", "id": "handbook"}).json()
    assert cube["object"] == "cube" and cube["id"] == "handbook"
    api(live, "POST", "/memories",
        json={"text": "Expense reports are due on the 5th.", "cube_id": "handbook"})
    sdk(live, user="bob").chat.completions.create(
        model="up", messages=[{"role": "user", "content": "When are expense reports due?"}],
        extra_body={"memory": {"cubes": ["handbook"]}})
    assert "due on the 5th" in system_content(upstream)
    assert "handbook" in [c["id"] for c in api(live, "GET", "/cubes").json()["data"]]
    export = api(live, "GET", "/cubes/handbook/export")
    assert export.headers["content-type"].startswith("application/x-ndjson")
    assert api(live, "DELETE", "/cubes/handbook").json()["deleted"] is True
    assert api(live, "GET", "/cubes/handbook").status_code == 404
    imported = api(live, "POST", "/cubes/import", content=export.content).json()
    assert (imported["id"], imported["imported"]) == ("handbook", 1)
    api(live, "POST", "/cubes", json={"name": "extra", "id": "extra"})
    api(live, "POST", "/memories", json={"text": "Expense reports are due on the 5th.",
                                         "cube_id": "extra"})
    api(live, "POST", "/memories", json={"text": "Travel needs approval.", "cube_id": "extra"})
    merged = api(live, "POST", "/cubes/handbook/merge", json={"source": "extra"}).json()
    assert merged["copied"] == 1
    assert api(live, "GET", "/cubes/handbook").json()["memories"] == 2


def test_unknown_mounted_cube_is_404(live: Live) -> None:
    r = httpx.post(f"{live.base_url}/chat/completions",
                   headers={"authorization": "Bearer sk-acme"},
                   json={"model": "up", "messages": [{"role": "user", "content": "x"}],
                         "memory": {"cubes": ["missing"]}})
    assert r.status_code == 404
    assert r.json()["error"]["param"] == "memory.cubes"


def test_purge_erases_a_user(live: Live) -> None:
    api(live, "POST", "/memories", json={"text": "Alice's secret", "user": "alice"})
    api(live, "POST", "/memories", json={"text": "Bob's note", "user": "bob"})
    assert api(live, "POST", "/memories/purge", json={"user": "alice"}).json()["deleted"] == 1
    users = {m["user"] for m in api(live, "GET", "/memories").json()["data"]}
    assert users == {"bob"}


def test_admin_erases_a_tenants_user_acting_for_the_tenant(live: Live) -> None:
    """Erasure requests reach an operator: an admin key acts for one tenant at a time."""
    api(live, "POST", "/memories", json={"text": "Alice's secret", "user": "alice"})
    api(live, "POST", "/memories", "globex", json={"text": "Globex's Alice", "user": "alice"})

    def as_admin(method: str, path: str, tenant: str | None, **kw: Any) -> httpx.Response:
        headers = {"authorization": f"Bearer {ADMIN_KEY}"}
        if tenant:
            headers["x-memcube-tenant"] = tenant
        return httpx.request(method, f"{live.base_url}{path}", headers=headers, **kw)

    # An admin holds no memories of its own: without naming a tenant it is told to.
    unnamed = as_admin("GET", "/memories", None)
    assert unnamed.status_code == 400
    assert unnamed.json()["error"]["param"] == "X-Memcube-Tenant"
    assert "X-Memcube-Tenant" in unnamed.json()["error"]["message"]
    seen = as_admin("GET", "/memories", "acme").json()["data"]
    assert [m["text"] for m in seen] == ["Alice's secret"]
    r = as_admin("POST", "/memories/purge", "acme", json={"user": "alice"})
    assert r.json()["deleted"] == 1
    assert api(live, "GET", "/memories").json()["data"] == []
    assert [m["text"] for m in api(live, "GET", "/memories", "globex").json()["data"]] == [
        "Globex's Alice"]


def test_upstream_prompt_starts_with_the_stable_activation_block(
        live: Live, upstream: FakeUpstream) -> None:
    """Providers' prefix caches need the same first message on every request: the
    activation block of pinned memories, with the per-request retrieval after it."""
    pinned = api(live, "POST", "/memories",
                 json={"user": "alice", "text": "Always answer in French.", "pinned": True})
    api(live, "POST", "/memories", json={"user": "alice", "text": "My dog is called Rex."})
    firsts, seconds = [], []
    for question in ("What is my dog called?", "Tell me a joke about Rex the dog."):
        raw = sdk(live).with_raw_response.chat.completions.create(
            model="up", messages=[{"role": "system", "content": "You are terse."},
                                  {"role": "user", "content": question}],
            extra_body={"memory": {"write": False}})
        sent = upstream.history[-1].body["messages"]
        firsts.append(sent[0])
        seconds.append(sent[1])
        assert raw.headers["x-memcube-activation"] == "none"  # no state kept for upstreams
        assert pinned.json()["id"] in raw.headers["x-memcube-memories"].split(",")
        # Then the client's system message, then the retrieved memories (not the pin again).
        assert sent[1] == {"role": "system", "content": "You are terse."}
        assert "Rex" in sent[2]["content"] and "French" not in sent[2]["content"]
    assert firsts[0] == firsts[1]
    assert firsts[0]["role"] == "system" and "Always answer in French." in firsts[0]["content"]
