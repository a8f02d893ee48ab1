"""Tenant and user isolation, by a seeded random walk over the whole memory surface.

Three tenants (auth on, a key each), three users each, and a shared cube per tenant
(all three named ``handbook``, plus one cube only that tenant has). Hundreds of
memories are written through the memory API and through chat write-back; every text
carries a marker naming its owner (``ref-acme-bob-0007``), and the texts are near
twins across owners (same sentence, other marker), with some exact twins, so that
retrieval and dedupe are tempted to cross. Then a few hundred random chat (streamed
and not) and memory/cube API calls run, and each is checked against a ledger of what
each owner wrote:

* nothing a response carries (body, headers, ``X-Memcube-Memories``), no prompt the
  fake upstream receives, no list, search, history or export holds another tenant's
  memory, nor another user's (a tenant's shared cube only when the request mounts it);
* another tenant's memory ids answer 404 to get, patch, delete and history, its cube
  ids 404 to get, export, delete, merge, search and mounting, and the memory is
  unchanged afterwards;
* lists, pages and exports hold exactly what the ledger says, no more, no less.

The seed is random per run and printed with any failure (``ISOLATION_SEED=...`` replays it).
"""

from __future__ import annotations

import json
import os
import random
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from memory.models import default_cube_id
from proxy.app import create_app
from proxy.settings import (
    AuthSettings,
    EmbedderSettings,
    MemorySettings,
    ModelConfig,
    Settings,
    TenantConfig,
)
from proxy.testing.fake_upstream import FakeUpstream
from proxy.testing.live import Live, serve

TENANTS = ("acme", "globex", "initech")
USERS = ("alice", "bob", "carol")
SHARED = "handbook"  # the same cube id in every tenant
LIBRARIAN = "librarian"  # the user field of shared-cube memories
KEYS = {t: f"sk-iso-{t}" for t in TENANTS}
MARKER = re.compile(r"ref-([a-z]+)-([a-z]+)-(\d{4})")
IDENT_API = "Identical note: my favourite colour is teal."
IDENT_CHAT = "Identical chat: I was born on a Tuesday in Lisbon."
TOPICS = [
    "My favourite tea is jasmine green tea",
    "The vault code word is heliotrope",
    "I park my car on level three of the garage",
    "My sister lives in Porto near the river",
    "I am allergic to peanuts and shellfish",
    "My dentist appointment is on Friday morning",
    "I play the cello in a community orchestra",
    "The wifi network is named after the dog",
    "My flight to Oslo leaves at seven",
    "I prefer answers in Portuguese",
    "My daughter's school is on Elm Street",
    "I run five kilometres every Sunday",
]
OPS = 300


def own_cube(tenant: str, user: str) -> str:
    return default_cube_id(tenant, user)


def only_cube(tenant: str) -> str:
    return f"{tenant}-only"


@dataclass
class Mem:
    """What one owner wrote: ``owner`` is a user, or SHARED for the shared cube."""

    tenant: str
    owner: str
    cube: str
    user: str
    text: str
    id: str | None = None  # learnt from the API, or from a list once written back
    status: str = "active"
    version: int = 1
    via_api: bool = True


class World:
    """The proxy under test, its clients, and the ledger of what each owner wrote."""

    def __init__(self, live: Live, upstream: FakeUpstream, rng: random.Random, seed: int) -> None:
        self.live, self.upstream, self.rng, self.seed = live, upstream, rng, seed
        self.clients = {t: httpx.Client(base_url=live.base_url, timeout=60,
                                        headers={"authorization": f"Bearer {KEYS[t]}"})
                        for t in TENANTS}
        self.mems: list[Mem] = []
        self.serial = 0
        self.checks = Counter[str]()

    def close(self) -> None:
        for client in self.clients.values():
            client.close()

    def why(self, what: str) -> str:
        return f"ISOLATION_SEED={self.seed}: {what}"

    def marker(self, tenant: str, owner: str) -> str:
        self.serial += 1
        return f"ref-{tenant}-{owner}-{self.serial:04d}"

    def call(self, tenant: str, method: str, path: str, user: str | None = None,
             **kw: Any) -> httpx.Response:
        headers = {"x-memcube-user": user} if user else {}
        r = self.clients[tenant].request(method, path, headers=headers, **kw)
        self.scan_headers(tenant, r, allowed=None)
        return r

    def by_id(self) -> dict[str, Mem]:
        return {m.id: m for m in self.mems if m.id is not None}

    def foreign_ids(self, tenant: str) -> set[str]:
        return {m.id for m in self.mems if m.id is not None and m.tenant != tenant}

    # -- checks -------------------------------------------------------------------------

    def assert_markers(self, text: str, allowed: set[tuple[str, str]], where: str) -> None:
        """Every marker in ``text`` names an allowed (tenant, owner)."""
        stray = {(t, o) for t, o, _ in MARKER.findall(text)} - allowed
        assert not stray, self.why(f"{where} carries {sorted(stray)}; allowed {sorted(allowed)}")

    def scan_headers(self, tenant: str, r: httpx.Response,
                     allowed: set[tuple[str, str]] | None) -> None:
        values = " ".join(f"{k}: {v}" for k, v in r.headers.items())
        leaked = {i for i in self.foreign_ids(tenant) if i in values}
        assert not leaked, self.why(f"headers of {r.request.url} name {sorted(leaked)}")
        self.assert_markers(values, allowed or set(), f"headers of {r.request.url}")

    def assert_404(self, r: httpx.Response, what: str) -> None:
        assert r.status_code == 404, self.why(f"{what}: {r.status_code} {r.text[:300]}")
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}, self.why(what)
        assert error["type"] == "not_found_error", self.why(what)
        self.checks["404"] += 1

    # -- writing ------------------------------------------------------------------------

    def write_api(self, tenant: str, specs: list[tuple[str, str, str, str]]) -> None:
        """(owner, cube, user, text) each, in one batch."""
        r = self.call(tenant, "POST", "/memories", json={"items": [
            {"text": text, "user": user, "cube_id": cube} for _, cube, user, text in specs]})
        assert r.status_code == 200, self.why(r.text)
        made = r.json()["data"]
        assert [(m["cube_id"], m["user"], m["text"]) for m in made] == [
            (cube, user, text) for _, cube, user, text in specs], self.why("batch write")
        for (owner, cube, user, text), m in zip(specs, made, strict=True):
            self.mems.append(Mem(tenant, owner, cube, user, text, id=m["id"]))

    def chat(self, tenant: str, user: str, content: str, *, stream: bool, write: bool,
             mount: bool, expect_hits: bool = True) -> None:
        allowed = {(tenant, user)} | ({(tenant, SHARED)} if mount else set())
        memory: dict[str, Any] = {"write": write}
        if mount:
            memory["cubes"] = [SHARED]
        body = {"model": "up", "stream": stream, "memory": memory,
                "messages": [{"role": "user", "content": content}]}
        client = self.clients[tenant]
        if stream:
            with client.stream("POST", "/chat/completions", json=body,
                               headers={"x-memcube-user": user}) as r:
                text = r.read().decode()
            assert text.rstrip().endswith("data: [DONE]"), self.why(text[-300:])
        else:
            r = client.post("/chat/completions", json=body, headers={"x-memcube-user": user})
            text = r.text
        assert r.status_code == 200, self.why(f"chat: {r.status_code} {text[:300]}")
        self.assert_markers(text, set(), "chat response body")  # the reply is the upstream's
        self.scan_headers(tenant, r, allowed)
        sent = self.upstream.history[-1].body["messages"]
        assert sent[-1] == {"role": "user", "content": content}, self.why("not our request")
        prompt = "\n".join(str(m["content"]) for m in sent)
        self.assert_markers(prompt, allowed, f"prompt of {tenant}/{user} (mount={mount})")
        ids = [i for i in r.headers["x-memcube-memories"].split(",") if i]
        if expect_hits:
            assert ids, self.why(f"nothing recalled for {tenant}/{user}: {content!r}")
        known = self.by_id()
        for memory_id in ids:
            m = known.get(memory_id)
            if m is None:  # written back since the last sync: it must be the tenant's own
                got = self.call(tenant, "GET", f"/memories/{memory_id}")
                assert got.status_code == 200, self.why(f"injected {memory_id} not {tenant}'s")
                m = self.find(tenant, got.json()["user"], got.json()["cube_id"],
                              got.json()["text"])
            assert (m.tenant, m.owner) in allowed, self.why(
                f"{tenant}/{user} (mount={mount}) was given {m}")
        if write:
            self.mems.append(Mem(tenant, user, own_cube(tenant, user), user, content,
                                 via_api=False))
        self.checks["chat"] += 1

    def find(self, tenant: str, user: str, cube: str, text: str) -> Mem:
        found = [m for m in self.mems if (m.tenant, m.user, m.cube, m.text) ==
                 (tenant, user, cube, text)]
        assert len(found) == 1, self.why(f"{tenant}/{user}/{cube}: {text!r} matches {found}")
        return found[0]

    def flush(self) -> None:
        r = self.call(self.rng.choice(TENANTS), "POST", "/memories/flush")
        assert r.json() == {"object": "memory.flush", "flushed": True}, self.why(r.text)

    def sync(self, tenant: str) -> None:
        """Flush, then list the whole tenant: it must hold exactly the ledger's memories
        (texts, owners, cubes, statuses, versions); ids written back are learnt here."""
        self.flush()
        listed = self.pages(tenant, {})
        mine = [m for m in self.mems if m.tenant == tenant]
        got = Counter((i["user"], i["cube_id"], i["text"], i["status"], i["version"])
                      for i in listed)
        want = Counter((m.user, m.cube, m.text, m.status, m.version) for m in mine)
        assert got == want, self.why(f"{tenant} lists {got - want} more, {want - got} fewer")
        for i in listed:
            m = self.find(tenant, i["user"], i["cube_id"], i["text"])
            assert m.id in (None, i["id"]), self.why(f"{m} listed as {i['id']}")
            m.id = i["id"]
        self.checks["sync"] += 1

    def pages(self, tenant: str, params: dict[str, Any], limit: int = 500) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        after: str | None = None
        while True:
            # Every status: the ledger holds deleted memories too (the default lists active).
            r = self.call(tenant, "GET", "/memories",
                          params={"status": "all", **params, "limit": limit,
                                  **({"after": after} if after else {})})
            assert r.status_code == 200, self.why(r.text)
            page = r.json()
            assert page["object"] == "list" and len(page["data"]) <= limit, self.why(r.text[:300])
            self.assert_markers(r.text, {(tenant, o) for o in (*USERS, SHARED)}, "list")
            items += page["data"]
            if not page["has_more"]:
                assert "next_after" not in page, self.why(r.text[:300])
                break
            assert len(page["data"]) == limit, self.why("a short page that has more")
            after = page["next_after"]
        ids = [i["id"] for i in items]
        assert len(ids) == len(set(ids)), self.why(f"pages of {tenant} {params} repeat an item")
        return items

    # -- random operations ----------------------------------------------------------------

    def some_topic(self) -> str:
        return self.rng.choice(TOPICS)

    def op_chat(self, tenant: str, user: str) -> None:
        write = self.rng.random() < 0.3
        topic = self.some_topic()
        content = (f"{topic}, as I said ({self.marker(tenant, user)})" if write
                   else f"What do you remember about this: {topic.lower()}?")
        self.chat(tenant, user, content, stream=self.rng.random() < 0.5, write=write,
                  mount=self.rng.random() < 0.4)

    def op_list(self, tenant: str, user: str) -> None:
        self.sync(tenant)
        params: dict[str, Any] = {}
        if self.rng.random() < 0.6:
            params["user"] = user
        cube = self.rng.choice([None, own_cube(tenant, user), SHARED, only_cube(tenant)])
        if cube is not None:
            params["cube_id"] = cube
        if self.rng.random() < 0.4:
            params["status"] = self.rng.choice(["active", "deleted"])
        listed = self.pages(tenant, params, limit=self.rng.randint(1, 40))
        want = {m.id for m in self.mems if m.tenant == tenant
                and params.get("user") in (None, m.user)
                and params.get("cube_id") in (None, m.cube)
                and params.get("status") in (None, m.status)}
        assert {i["id"] for i in listed} == want, self.why(f"list {tenant} {params}")
        self.checks["list"] += 1

    def op_search(self, tenant: str, user: str) -> None:
        body: dict[str, Any] = {"query": self.some_topic(), "top_k": self.rng.randint(1, 20)}
        scope = self.rng.choice(["user", "own", "shared", "tenant"])
        if scope == "user":
            body["user"] = user
        elif scope == "own":
            body["cubes"] = [own_cube(tenant, user)]
        elif scope == "shared":
            body["cubes"] = [SHARED]
        r = self.call(tenant, "POST", "/memories/search", json=body)
        assert r.status_code == 200, self.why(r.text)
        hits = r.json()["data"]
        assert 0 < len(hits) <= body["top_k"], self.why(f"search {tenant} {body}: {len(hits)}")
        allowed = ({(tenant, user)} if scope in ("user", "own") else
                   {(tenant, SHARED)} if scope == "shared" else
                   {(tenant, o) for o in (*USERS, SHARED)})
        self.assert_markers(r.text, allowed, f"search {tenant}/{user} {scope}")
        known = self.by_id()
        for hit in hits:
            m = known.get(hit["id"]) or self.find(tenant, hit["user"], hit["cube_id"], hit["text"])
            assert m.tenant == tenant and (tenant, m.owner) in allowed, self.why(f"hit {m}")
            assert hit["status"] == "active" and hit["text"] == m.text, self.why(f"hit {hit}")
        self.checks["search"] += 1

    def api_mem(self, tenant: str) -> Mem:
        return self.rng.choice([m for m in self.mems if m.tenant == tenant and m.via_api])

    def op_own_crud(self, tenant: str, user: str) -> None:
        m = self.api_mem(tenant)  # any of the tenant's memories: users share a tenant's API
        action = self.rng.choice(["get", "history", "patch", "delete"])
        if action == "patch":
            text = f"{m.text} (edited)"
            r = self.call(tenant, "PATCH", f"/memories/{m.id}", json={"text": text})
            assert r.status_code == 200, self.why(r.text)
            m.text, m.version = text, m.version + 1
        elif action == "delete":
            r = self.call(tenant, "DELETE", f"/memories/{m.id}")
            assert r.json() == {"id": m.id, "object": "memory.deleted", "deleted": True,
                                "version": m.version + 1}, self.why(r.text)
            m.status, m.version = "deleted", m.version + 1
        elif action == "history":
            r = self.call(tenant, "GET", f"/memories/{m.id}/history")
            versions = r.json()["data"]
            assert [v["version"] for v in versions] == list(range(1, m.version + 1)), self.why(
                r.text[:300])
            assert {v["id"] for v in versions} == {m.id}, self.why(r.text[:300])
            self.assert_markers(r.text, {(tenant, m.owner)}, "history")
        self.expect_unchanged(m)
        self.checks[f"own {action}"] += 1

    def expect_unchanged(self, m: Mem) -> None:
        r = self.call(m.tenant, "GET", f"/memories/{m.id}")
        assert r.status_code == 200, self.why(r.text)
        got = r.json()
        assert (got["id"], got["cube_id"], got["user"], got["text"], got["status"],
                got["version"]) == (m.id, m.cube, m.user, m.text, m.status, m.version), (
            self.why(f"{got} is not {m}"))

    def op_foreign_memory(self, tenant: str, user: str) -> None:
        other = self.rng.choice([t for t in TENANTS if t != tenant])
        m = self.api_mem(other) if self.rng.random() < 0.7 else self.rng.choice(
            [x for x in self.mems if x.tenant == other and x.id is not None])
        self.assert_404(self.call(tenant, "GET", f"/memories/{m.id}", user),
                        f"{tenant} GET {other}'s memory")
        self.assert_404(self.call(tenant, "GET", f"/memories/{m.id}/history", user),
                        f"{tenant} history of {other}'s memory")
        self.assert_404(self.call(tenant, "PATCH", f"/memories/{m.id}", user,
                                  json={"text": f"hijacked by {tenant}", "pinned": True}),
                        f"{tenant} PATCH {other}'s memory")
        self.assert_404(self.call(tenant, "DELETE", f"/memories/{m.id}", user),
                        f"{tenant} DELETE {other}'s memory")
        self.expect_unchanged(m)

    def op_foreign_cube(self, tenant: str, user: str) -> None:
        other = self.rng.choice([t for t in TENANTS if t != tenant])
        cube = self.rng.choice([only_cube(other), own_cube(other, self.rng.choice(USERS))])
        self.assert_404(self.call(tenant, "GET", f"/cubes/{cube}"), f"{tenant} GET {cube}")
        self.assert_404(self.call(tenant, "GET", f"/cubes/{cube}/export"),
                        f"{tenant} export {cube}")
        self.assert_404(self.call(tenant, "POST", f"/cubes/{SHARED}/merge",
                                  json={"source": cube}), f"{tenant} merge from {cube}")
        self.assert_404(self.call(tenant, "POST", "/memories/search",
                                  json={"query": self.some_topic(), "cubes": [cube]}),
                        f"{tenant} search in {cube}")
        r = self.call(tenant, "POST", "/chat/completions", user, json={
            "model": "up", "messages": [{"role": "user", "content": self.some_topic()}],
            "memory": {"cubes": [cube]}})
        self.assert_404(r, f"{tenant} mounts {cube}")
        assert r.json()["error"]["param"] == "memory.cubes", self.why(r.text)
        r = self.call(tenant, "POST", "/memories", user, json={"text": "planted", "cube_id": cube})
        self.assert_404(r, f"{tenant} writes into {cube}")
        self.assert_404(self.call(tenant, "DELETE", f"/cubes/{cube}"), f"{tenant} DELETE {cube}")
        listed = self.call(tenant, "GET", "/memories",
                           params={"cube_id": cube, "status": "all"}).json()
        assert listed == {"object": "list", "data": [], "has_more": False}, self.why(str(listed))
        # The owner still has it, whole (once write-back has caught up with chats the
        # ledger already counts).
        self.flush()
        r = self.call(other, "GET", f"/cubes/{cube}")
        assert r.status_code == 200 and r.json()["id"] == cube, self.why(r.text)
        assert r.json()["memories"] == sum(m.tenant == other and m.cube == cube
                                           for m in self.mems), self.why(r.text)

    def op_cubes(self, tenant: str, user: str) -> None:
        self.sync(tenant)
        r = self.call(tenant, "GET", "/cubes")
        want = {m.cube for m in self.mems if m.tenant == tenant} | {SHARED, only_cube(tenant)}
        assert {c["id"] for c in r.json()["data"]} == want, self.why(r.text[:500])
        cube = self.rng.choice([SHARED, own_cube(tenant, user)])
        owner = SHARED if cube == SHARED else user
        r = self.call(tenant, "GET", f"/cubes/{cube}")
        mine = [m for m in self.mems if m.tenant == tenant and m.cube == cube]
        assert r.status_code == 200 and r.json()["memories"] == len(mine), self.why(r.text)
        r = self.call(tenant, "GET", f"/cubes/{cube}/export")
        assert r.status_code == 200, self.why(r.text)
        self.assert_markers(r.text, {(tenant, owner)}, f"export of {tenant}/{cube}")
        lines = [json.loads(x) for x in r.text.splitlines()]
        assert lines[0]["object"] == "cube" and lines[0]["id"] == cube, self.why(r.text[:300])
        assert "tenant" not in lines[0] and all("tenant" not in x for x in lines), self.why("tenant")
        versions = Counter(x["id"] for x in lines[1:])
        assert versions == Counter({m.id: m.version for m in mine}), self.why(
            f"export of {tenant}/{cube}")
        self.checks["cubes"] += 1


@pytest.fixture
def live(tmp_path: Path, upstream: FakeUpstream, model_cache: Path) -> Iterator[Live]:
    settings = Settings(
        data_dir=tmp_path / "data",
        models=[ModelConfig(name="up", backend="litellm", model="openai/fake-model",
                            api_base=upstream.url, max_retries=0, transport="direct")],
        auth=AuthSettings(enabled=True, admin_keys=["sk-iso-admin"]),
        tenants=[TenantConfig(id=t, api_keys=[k]) for t, k in KEYS.items()],
        memory=MemorySettings(embedder=EmbedderSettings(cache_dir=model_cache)),
    )
    with serve(create_app(settings)) as server:
        yield server


def populate(w: World) -> None:
    """Near twins everywhere: every owner writes every topic, under its own marker."""
    for tenant in TENANTS:
        for cube in (SHARED, only_cube(tenant)):
            r = w.call(tenant, "POST", "/cubes", json={"name": f"{tenant} {cube}", "id": cube})
            assert r.status_code == 200, w.why(r.text)
        specs = []
        for user in USERS:
            specs += [(user, own_cube(tenant, user), user,
                       f"{topic} ({w.marker(tenant, user)})") for topic in TOPICS]
            specs += [(user, own_cube(tenant, user), user,
                       f"{w.rng.choice(TOPICS)}, really ({w.marker(tenant, user)})")
                      for _ in range(6)]
            specs.append((user, own_cube(tenant, user), user, IDENT_API))
        specs += [(SHARED, SHARED, LIBRARIAN, f"Team rule: {topic.lower()} "
                   f"({w.marker(tenant, SHARED)})") for topic in TOPICS]
        w.write_api(tenant, specs)
        w.write_api(tenant, [(SHARED, only_cube(tenant), LIBRARIAN,
                              f"Only here: {t} ({w.marker(tenant, SHARED)})")
                             for t in TOPICS[:3]])
    # Write-back: the same chats from every owner; the exact twin must be kept once per
    # owner (dedupe is per cube), never skipped because another owner said it first.
    for tenant in TENANTS:
        for user in USERS:
            for topic in w.rng.sample(TOPICS, 4):
                w.chat(tenant, user, f"{topic}, I told you ({w.marker(tenant, user)})",
                       stream=w.rng.random() < 0.5, write=True, mount=False)
            w.chat(tenant, user, IDENT_CHAT, stream=False, write=True, mount=False)
    for tenant in TENANTS:
        w.sync(tenant)


def test_random_walk_never_crosses_tenants_or_users(live: Live, upstream: FakeUpstream) -> None:
    seed = int(os.environ.get("ISOLATION_SEED") or random.randrange(2**32))
    print(f"ISOLATION_SEED={seed}")
    w = World(live, upstream, random.Random(seed), seed)
    try:
        populate(w)
        assert len(w.mems) >= 250, w.why(f"only {len(w.mems)} memories")
        ops = [(w.op_chat, 40), (w.op_search, 15), (w.op_own_crud, 15),
               (w.op_foreign_memory, 12), (w.op_foreign_cube, 6), (w.op_list, 7),
               (w.op_cubes, 5)]
        for _ in range(OPS):
            op = w.rng.choices([o for o, _ in ops], weights=[n for _, n in ops])[0]
            op(w.rng.choice(TENANTS), w.rng.choice(USERS))
        for tenant in TENANTS:
            w.sync(tenant)
    finally:
        w.close()
    print(dict(w.checks))
    assert w.checks["chat"] >= 100 and w.checks["404"] >= 100, w.why(str(w.checks))
