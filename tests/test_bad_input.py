"""Bad input: a corpus of malformed requests against every endpoint, over real HTTP.

One proxy serves the whole corpus: auth on, memory on (real Qdrant Edge on disk, the
real MiniLM embedder), the scripted fake upstream as the model. Every case must answer
its 4xx with the OpenAI error shape and a message that says what was wrong (naming the
``param`` where one applies), the server must answer the next request, and at the end,
after a flush, no bad request has left a memory, a cube, an adapter or an upstream call
behind. Add a case to ``CORPUS`` to extend it.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

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

KEY = "sk-bad-input-tenant"
ADMIN = "sk-bad-input-admin"
LIMIT = 2 * 1024 * 1024  # max_body_bytes of the server under test
ERROR_KEYS = {"message", "type", "param", "code"}
OK_MESSAGES = [{"role": "user", "content": "hi"}]
CUBE = "kb"  # a shared cube the fixture creates, so cases can name a real one

# Filled in by the fixture: a real memory id, so PATCH cases reach validation.
MEMORY = "{memory}"


@dataclass(frozen=True)
class Case:
    """One malformed request and the error it must get.

    ``body`` is sent as JSON unless it is bytes (sent as they are). ``param`` is the
    exact ``error.param``; ``says`` is a fragment the message must contain.
    """

    id: str
    method: str
    path: str
    status: int
    says: str
    param: str | None = None
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    key: str | None = KEY
    type: str | None = None  # default: from the status
    code: str | None = None  # checked when given


TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
         404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
         415: "invalid_request_error"}

LONG = "x" * 100_000  # 100 KB: a header value, a body field
LONG_QUERY = "q" * 60_000  # the most a URL may carry through httpx
NESTED = b"[" * 100_000 + b"]" * 100_000
NESTED_OBJ = b'{"a":' * 100_000 + b"1" + b"}" * 100_000
BAD_UTF8 = b'{"model": "up", "messages": [{"role": "user", "content": "caf\xc3\x28 \xff"}]}'
TOO_BIG = 5 * 1024 * 1024  # over LIMIT
BIG = LIMIT - 64 * 1024  # under LIMIT, yet far over any field's own limit


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": "up", "messages": OK_MESSAGES, **fields}


def chat_cases(stream: bool) -> list[Case]:
    """The chat corpus, sent once as a plain request and once with ``stream: true``:
    a bad streamed request must fail before the stream starts, as plain JSON."""
    s = {"stream": True} if stream else {}
    tag = "stream" if stream else "plain"
    p = "/v1/chat/completions"

    def c(id: str, status: int, says: str, param: str | None, body: Any, **kw: Any) -> Case:
        if isinstance(body, dict):
            body = {**s, **body}
        return Case(f"chat-{tag}-{id}", "POST", p, status, says, param, body, **kw)

    return [
        c("invalid-json", 400, "not valid JSON", None, b'{"model": "up", "messages": [',
          code="invalid_json"),
        c("empty-body", 400, "body is empty", None, b"", code="invalid_json"),
        c("invalid-utf8", 400, "not valid UTF-8: byte 0xc3 at position 61", None, BAD_UTF8,
          code="invalid_json"),
        c("lone-surrogate", 400, "not valid JSON", None,
          b'{"model": "up", "messages": [{"role": "user", "content": "\\ud800"}]}',
          code="invalid_json"),
        c("nan", 400, "not valid JSON", None,
          b'{"model": "up", "messages": [{"role": "user", "content": "hi"}], "seed": NaN}',
          code="invalid_json"),
        c("nested-arrays", 400, "nested too deeply", None, NESTED, code="invalid_json"),
        c("nested-objects", 400, "nested too deeply", None, NESTED_OBJ, code="invalid_json"),
        c("nested-in-a-field", 400, "nested too deeply", None,
          b'{"model": "up", "messages": [{"role": "user", "content": "hi"}], "metadata": '
          + b"[" * 5000 + b"]" * 5000 + b"}", code="invalid_json"),
        c("form-content-type", 415, "Unsupported Content-Type 'application/x-www-form-urlencoded'",
          None, chat(), headers={"content-type": "application/x-www-form-urlencoded"},
          code="unsupported_media_type"),
        c("text-content-type", 415, "Unsupported Content-Type 'text/plain'", None, chat(),
          headers={"content-type": "text/plain; charset=utf-8"}, code="unsupported_media_type"),
        c("multipart-content-type", 415, "send the body as application/json", None,
          b"--b\r\nContent-Disposition: form-data; name=model\r\n\r\nup\r\n--b--",
          headers={"content-type": "multipart/form-data; boundary=b"},
          code="unsupported_media_type"),
        c("array-body", 400, "JSON object", None, [chat()], code="invalid_json"),
        c("string-body", 400, "JSON object", None, "hello", code="invalid_json"),
        c("null-body", 400, "JSON object", None, None, code="invalid_json"),
        c("missing-model", 400, "Missing required parameter", "model",
          {"messages": OK_MESSAGES}),
        c("missing-messages", 400, "Missing required parameter", "messages", {"model": "up"}),
        c("empty-messages", 400, "at least 1", "messages", chat(messages=[])),
        c("model-int", 400, "valid string", "model", chat(model=7)),
        c("model-empty", 400, "at least 1", "model", chat(model="")),
        c("model-unknown", 404, "does not exist", "model", chat(model="nope"),
          code="model_not_found"),
        c("model-huge", 404, f"The model '{'x' * 200}...' does not exist", "model",
          chat(model=LONG), code="model_not_found"),
        c("messages-object", 400, "valid list", "messages", chat(messages={"role": "user"})),
        c("message-string", 400, "valid dictionary", "messages.[0]", chat(messages=["hi"])),
        c("role-unknown", 400, "'system', 'developer', 'user', 'assistant', 'tool' or "
          "'function'", "messages.[0].role", chat(messages=[{"role": "wizard",
                                                             "content": "hi"}])),
        c("role-missing", 400, "Missing required parameter", "messages.[0].role",
          chat(messages=[{"content": "hi"}])),
        c("role-int", 400, "Input should be", "messages.[0].role",
          chat(messages=[{"role": 1, "content": "hi"}])),
        c("content-int", 400, "Input should be a valid string or a valid list",
          "messages.[0].content", chat(messages=[{"role": "user", "content": 42}])),
        c("content-list-of-strings", 400, "valid dictionary", "messages.[0].content.[0]",
          chat(messages=[{"role": "user", "content": ["hi"]}])),
        c("name-int", 400, "valid string", "messages.[0].name",
          chat(messages=[{"role": "user", "content": "hi", "name": 3}])),
        c("stream-string", 400, "valid boolean", "stream", chat(stream="yes")),
        c("stream-options-string", 400, "valid dictionary", "stream_options",
          chat(stream_options="usage")),
        c("include-usage-string", 400, "valid boolean", "stream_options.include_usage",
          chat(stream_options={"include_usage": "true"})),
        c("temperature-string", 400, "valid number", "temperature", chat(temperature="hot")),
        c("temperature-negative", 400, "greater than or equal to 0", "temperature",
          chat(temperature=-1)),
        c("temperature-absurd", 400, "less than or equal to 2", "temperature",
          chat(temperature=1e308)),
        c("top-p-absurd", 400, "less than or equal to 1", "top_p", chat(top_p=7)),
        c("n-zero", 400, "greater than or equal to 1", "n", chat(n=0)),
        c("n-absurd", 400, "less than or equal to 128", "n", chat(n=10**9)),
        c("n-float", 400, "valid integer", "n", chat(n=1.5)),
        c("max-tokens-negative", 400, "greater than or equal to 1", "max_tokens",
          chat(max_tokens=-5)),
        c("max-tokens-zero", 400, "greater than or equal to 1", "max_tokens",
          chat(max_tokens=0)),
        c("max-tokens-string", 400, "valid integer", "max_tokens", chat(max_tokens="10")),
        c("max-tokens-bool", 400, "valid integer", "max_tokens", chat(max_tokens=True)),
        c("max-tokens-huge-int", 400, "less than or equal to 2147483647", "max_tokens",
          chat(max_tokens=10**30)),
        c("seed-huge-int", 400, "less than or equal to 9223372036854775807", "seed",
          chat(seed=10**30)),
        c("max-completion-tokens-negative", 400, "greater than or equal to 1",
          "max_completion_tokens", chat(max_completion_tokens=-1)),
        c("stop-int", 400, "Input should be a valid string or a valid list", "stop",
          chat(stop=5)),
        c("stop-list-of-ints", 400, "valid string", "stop.[0]", chat(stop=[1, 2])),
        c("seed-string", 400, "valid integer", "seed", chat(seed="x")),
        c("presence-penalty-absurd", 400, "less than or equal to 2", "presence_penalty",
          chat(presence_penalty=99)),
        c("frequency-penalty-absurd", 400, "greater than or equal to -2", "frequency_penalty",
          chat(frequency_penalty=-99)),
        c("user-int", 400, "valid string", "user", chat(user=12345)),
        c("user-object", 400, "valid string", "user", chat(user={"id": "alice"})),
        c("user-huge", 400, "at most 256 characters", "user", chat(user=LONG)),
        c("memory-string", 400, "valid dictionary", "memory", chat(memory="on")),
        c("memory-list", 400, "valid dictionary", "memory", chat(memory=[True])),
        c("memory-unknown-key", 400, "Extra inputs are not permitted", "memory.recall",
          chat(memory={"recall": True})),
        c("memory-enabled-string", 400, "valid boolean", "memory.enabled",
          chat(memory={"enabled": "false"})),
        c("memory-write-int", 400, "valid boolean", "memory.write", chat(memory={"write": 0})),
        c("memory-cubes-string", 400, "valid list", "memory.cubes",
          chat(memory={"cubes": CUBE})),
        c("memory-cubes-ints", 400, "valid string", "memory.cubes.[0]",
          chat(memory={"cubes": [1]})),
        c("memory-cubes-huge-list", 400, "at most 64 items", "memory.cubes",
          chat(memory={"cubes": [f"c{i}" for i in range(10_000)]})),
        c("memory-cube-id-huge", 400, "at most 256 characters", "memory.cubes.[0]",
          chat(memory={"cubes": [LONG]})),
        c("memory-cube-id-empty", 400, "at least 1 character", "memory.cubes.[0]",
          chat(memory={"cubes": [""]})),
        c("memory-cube-unknown", 404, "No cube 'nope'", "memory.cubes",
          chat(memory={"cubes": ["nope"]})),
        c("memory-write-cube-unknown", 404, "No cube 'nope'", "memory.write_cube",
          chat(memory={"write_cube": "nope"})),
        c("memory-write-cube-int", 400, "valid string", "memory.write_cube",
          chat(memory={"write_cube": 5})),
        c("memory-top-k-negative", 400, "greater than or equal to 0", "memory.top_k",
          chat(memory={"top_k": -1})),
        c("memory-top-k-absurd", 400, "less than or equal to 100", "memory.top_k",
          chat(memory={"top_k": 10**12})),
        c("memory-top-k-float", 400, "valid integer", "memory.top_k",
          chat(memory={"top_k": 2.5})),
        c("memory-max-tokens-negative", 400, "greater than or equal to 0", "memory.max_tokens",
          chat(memory={"max_tokens": -100})),
        c("memory-max-tokens-absurd", 400, "less than or equal to 2147483647",
          "memory.max_tokens",
          chat(memory={"max_tokens": 10**30})),
        c("memory-null-nested-junk", 400, "Extra inputs are not permitted", "memory.junk",
          chat(memory={"enabled": True, "junk": {"deep": [1, 2, 3]}})),
        c("over-limit", 413, "larger than the limit", None,
          b'{"model": "up", "messages": [{"role": "user", "content": "' + b"a" * TOO_BIG
          + b'"}]}', code="payload_too_large"),
        c("big-but-allowed-with-bad-role", 400, "Input should be", "messages.[1].role",
          chat(messages=[{"role": "user", "content": "a" * BIG}, {"role": "robot"}])),
        c("user-header-huge", 400, "The X-Memcube-User header is 100000 characters long; at "
          "most 256", "x-memcube-user", chat(), headers={"x-memcube-user": LONG},
          code="invalid_header"),
        c("session-header-huge", 400, "The X-Memcube-Session header is 100000 characters",
          "x-memcube-session", chat(), headers={"x-memcube-session": LONG},
          code="invalid_header"),
        c("tenant-header-unknown", 404, "No tenant", None, chat(),
          headers={"x-memcube-tenant": LONG}, key=ADMIN, code="tenant_not_found"),
        c("tenant-header-not-admin", 403, "Only admin keys", None, chat(),
          headers={"x-memcube-tenant": "other"}),
        c("authorization-huge", 401, "Incorrect API key", None, chat(),
          headers={"authorization": f"Bearer {LONG}"}, key=None),
        c("authorization-missing", 401, "Missing API key", None, chat(), key=None),
    ]


def memory_cases() -> list[Case]:
    m = "/v1/memories"
    return [
        # POST /v1/memories
        Case("create-invalid-json", "POST", m, 400, "not valid JSON", None, b'{"text": ',
             code="invalid_json"),
        Case("create-empty-body", "POST", m, 400, "body is empty", None, b"",
             code="invalid_json"),
        Case("create-invalid-utf8", "POST", m, 400, "not valid UTF-8: byte 0xff", None,
             b'{"text": "\xff\xfe"}', code="invalid_json"),
        Case("create-nested", "POST", m, 400, "nested too deeply", None, NESTED,
             code="invalid_json"),
        Case("create-array", "POST", m, 400, "must be a JSON object", None, [{"text": "a"}],
             code="invalid_json"),
        Case("create-missing-text", "POST", m, 400, "Missing required parameter", "text",
             {"user": "alice"}),
        Case("create-text-int", "POST", m, 400, "valid string", "text", {"text": 5}),
        Case("create-text-empty", "POST", m, 400, "at least 1 character", "text", {"text": ""}),
        Case("create-text-blank", "POST", m, 400, "must not be empty", "text", {"text": "   "}),
        Case("create-text-huge", "POST", m, 400, "at most 20000 characters", "text",
             {"text": "a" * BIG}),
        Case("create-user-int", "POST", m, 400, "valid string", "user", {"text": "a", "user": 1}),
        Case("create-user-huge", "POST", m, 400, "at most 256 characters", "user",
             {"text": "a", "user": LONG}),
        Case("create-type-unknown", "POST", m, 400, "'fact', 'preference', 'event' or 'raw'",
             "type", {"text": "a", "type": "secret"}),
        Case("create-tags-string", "POST", m, 400, "valid list", "tags",
             {"text": "a", "tags": "x"}),
        Case("create-tags-huge", "POST", m, 400, "at most 64 items", "tags",
             {"text": "a", "tags": ["t"] * 10_000}),
        Case("create-pinned-string", "POST", m, 400, "valid boolean", "pinned",
             {"text": "a", "pinned": "yes"}),
        Case("create-created-at-negative", "POST", m, 400, "greater than or equal to 0",
             "created_at", {"text": "a", "created_at": -1}),
        Case("create-created-at-absurd", "POST", m, 400, "less than or equal to 253402300799",
             "created_at", {"text": "a", "created_at": 10**30}),
        Case("create-cube-id-huge", "POST", m, 400, "at most 256 characters", "cube_id",
             {"text": "a", "cube_id": LONG}),
        Case("create-tag-huge", "POST", m, 400, "at most 256 characters", "tags.[0]",
             {"text": "a", "tags": [LONG]}),
        Case("create-unknown-field", "POST", m, 400, "Extra inputs are not permitted", "colour",
             {"text": "a", "colour": "red"}),
        Case("create-cube-unknown", "POST", m, 404, "No cube 'nope'", "cube_id",
             {"text": "a", "cube_id": "nope"}),
        Case("create-sources-junk", "POST", m, 400, "valid dictionary", "sources.[0]",
             {"text": "a", "sources": ["x"]}),
        Case("create-source-at-string", "POST", m, 400, "valid integer", "sources.[0].at",
             {"text": "a", "sources": [{"at": "now"}]}),
        Case("create-source-at-absurd", "POST", m, 400, "less than or equal to 253402300799",
             "sources.[0].at", {"text": "a", "sources": [{"at": 10**20}]}),
        Case("create-source-unknown-key", "POST", m, 400, "Extra inputs are not permitted",
             "sources.[0].tenant", {"text": "a", "sources": [{"tenant": "other"}]}),
        Case("create-items-empty", "POST", m, 400, "at least 1 item", "items", {"items": []}),
        Case("create-items-not-list", "POST", m, 400, "valid list", "items", {"items": "a"}),
        Case("create-items-bad-member", "POST", m, 400, "Missing required parameter",
             "items.[1].text", {"items": [{"text": "fine"}, {"tags": []}]}),
        Case("create-items-cube-unknown", "POST", m, 404, "No cube 'nope'", "cube_id",
             {"items": [{"text": "fine"}, {"text": "b", "cube_id": "nope"}]}),
        Case("create-over-limit", "POST", m, 413, "larger than the limit", None,
             b'{"text": "' + b"a" * TOO_BIG + b'"}', code="payload_too_large"),
        Case("create-form-encoded", "POST", m, 415, "Unsupported Content-Type", None,
             b"text=hello", headers={"content-type": "application/x-www-form-urlencoded"},
             code="unsupported_media_type"),
        Case("create-user-header-huge", "POST", m, 400, "X-Memcube-User header",
             "x-memcube-user", {"text": "a"}, headers={"x-memcube-user": LONG},
             code="invalid_header"),
        # GET /v1/memories
        Case("list-limit-negative", "GET", f"{m}?limit=-1", 400, "greater than or equal to 1",
             "limit"),
        Case("list-limit-zero", "GET", f"{m}?limit=0", 400, "greater than or equal to 1",
             "limit"),
        Case("list-limit-absurd", "GET", f"{m}?limit=99999999999999999999", 400,
             "less than or equal to 1000", "limit"),
        Case("list-limit-word", "GET", f"{m}?limit=ten", 400, "valid integer", "limit"),
        Case("list-status-unknown", "GET", f"{m}?status=gone", 400,
             "'active', 'archived', 'deleted' or 'all'", "status"),
        Case("list-cursor-junk", "GET", f"{m}?after=%%%", 400, "Invalid 'after' cursor",
             "after"),
        Case("list-cursor-huge", "GET", f"{m}?after={LONG_QUERY}", 400,
             "at most 200 characters", "after"),
        Case("list-cursor-not-a-cursor", "GET", f"{m}?after=bm90IGEgY3Vyc29y", 400,
             "Invalid 'after' cursor", "after"),
        Case("list-user-huge", "GET", f"{m}?user={LONG_QUERY}", 400, "at most 256 characters",
             "user"),
        Case("list-cube-huge", "GET", f"{m}?cube_id={LONG_QUERY}", 400,
             "at most 256 characters", "cube_id"),
        # POST /v1/memories/search
        Case("search-missing-query", "POST", f"{m}/search", 400, "Missing required parameter",
             "query", {"top_k": 3}),
        Case("search-query-int", "POST", f"{m}/search", 400, "valid string", "query",
             {"query": 1}),
        Case("search-top-k-zero", "POST", f"{m}/search", 400, "greater than or equal to 1",
             "top_k", {"query": "a", "top_k": 0}),
        Case("search-top-k-absurd", "POST", f"{m}/search", 400, "less than or equal to 100",
             "top_k", {"query": "a", "top_k": 10**9}),
        Case("search-top-k-negative", "POST", f"{m}/search", 400,
             "greater than or equal to 1", "top_k", {"query": "a", "top_k": -3}),
        Case("search-status-empty", "POST", f"{m}/search", 400, "at least 1 item", "status",
             {"query": "a", "status": []}),
        Case("search-status-unknown", "POST", f"{m}/search", 400, "'active', 'archived'",
             "status.[0]", {"query": "a", "status": ["gone"]}),
        Case("search-cubes-unknown", "POST", f"{m}/search", 404, "No cube 'nope'", "cubes",
             {"query": "a", "cubes": ["nope"]}),
        Case("search-cubes-huge", "POST", f"{m}/search", 400, "at most 64 items", "cubes",
             {"query": "a", "cubes": ["c"] * 10_000}),
        Case("search-user-huge", "POST", f"{m}/search", 400, "at most 256 characters", "user",
             {"query": "a", "user": LONG}),
        Case("search-top-k-string", "POST", f"{m}/search", 400, "valid integer", "top_k",
             {"query": "a", "top_k": "5"}),
        Case("search-invalid-json", "POST", f"{m}/search", 400, "not valid JSON", None, b"{",
             code="invalid_json"),
        Case("search-nested", "POST", f"{m}/search", 400, "nested too deeply", None,
             NESTED_OBJ, code="invalid_json"),
        Case("search-text-content-type", "POST", f"{m}/search", 415, "Unsupported Content-Type",
             None, b'{"query": "a"}', headers={"content-type": "text/plain"}),
        # POST /v1/memories/purge
        Case("purge-missing-user", "POST", f"{m}/purge", 400, "Missing required parameter",
             "user", {}),
        Case("purge-user-int", "POST", f"{m}/purge", 400, "valid string", "user", {"user": 3}),
        Case("purge-user-huge", "POST", f"{m}/purge", 400, "at most 256 characters", "user",
             {"user": LONG}),
        Case("purge-invalid-json", "POST", f"{m}/purge", 400, "not valid JSON", None, b"user",
             code="invalid_json"),
        # GET|PATCH|DELETE /v1/memories/{id}, history
        Case("get-unknown", "GET", f"{m}/nope", 404, "No memory 'nope'", None),
        Case("get-dotdot", "GET", f"{m}/%2E%2E", 404, "No memory '..'", None),
        Case("get-nul", "GET", f"{m}/a%00b", 404, "No memory", None),
        Case("get-odd-chars", "GET", f"{m}/%F0%9F%92%A5%22%27%3C%3E", 404, "No memory", None),
        Case("get-huge-id", "GET", f"{m}/{'a' * 10_000}", 400, "at most 256 characters",
             "memory_id"),
        Case("patch-huge-id", "PATCH", f"{m}/{'a' * 10_000}", 400, "at most 256 characters",
             "memory_id", {"text": "a"}),
        Case("history-huge-id", "GET", f"{m}/{'a' * 10_000}/history", 400,
             "at most 256 characters", "memory_id"),
        Case("get-slash", "GET", f"{m}/a%2Fb", 404, "Unknown path", None),
        Case("history-unknown", "GET", f"{m}/nope/history", 404, "No memory 'nope'", None),
        Case("delete-unknown", "DELETE", f"{m}/nope", 404, "No memory 'nope'", None),
        Case("patch-unknown", "PATCH", f"{m}/nope", 404, "No memory 'nope'", None,
             {"text": "a"}),
        Case("patch-text-int", "PATCH", f"{m}/{MEMORY}", 400, "valid string", "text",
             {"text": 1}),
        Case("patch-text-blank", "PATCH", f"{m}/{MEMORY}", 400, "must not be empty", "text",
             {"text": " \n "}),
        Case("patch-status-unknown", "PATCH", f"{m}/{MEMORY}", 400,
             "'active', 'archived' or 'deleted'", "status", {"status": "purged"}),
        Case("patch-unknown-field", "PATCH", f"{m}/{MEMORY}", 400,
             "Extra inputs are not permitted", "cube_id", {"cube_id": "kb"}),
        Case("patch-invalid-json", "PATCH", f"{m}/{MEMORY}", 400, "not valid JSON", None,
             b"[[[", code="invalid_json"),
        Case("patch-array", "PATCH", f"{m}/{MEMORY}", 400, "must be a JSON object", None, [1],
             code="invalid_json"),
        Case("patch-type-unknown", "PATCH", f"{m}/{MEMORY}", 400, "'fact', 'preference'",
             "type", {"type": "secret"}),
        Case("patch-pinned-string", "PATCH", f"{m}/{MEMORY}", 400, "valid boolean", "pinned",
             {"pinned": "true"}),
        Case("patch-tags-huge", "PATCH", f"{m}/{MEMORY}", 400, "at most 64 items", "tags",
             {"tags": ["t"] * 1000}),
        # wrong methods
        Case("put-memories", "PUT", m, 405, "Method Not Allowed", None, {"text": "a"}),
        Case("get-flush", "GET", f"{m}/flush", 404, "No memory 'flush'", None),
        Case("delete-search", "DELETE", f"{m}/search", 404, "No memory 'search'", None),
        Case("post-memory-id", "POST", f"{m}/{MEMORY}", 405, "Method Not Allowed", None,
             {"text": "a"}),
    ]


def cube_cases() -> list[Case]:
    cb = "/v1/cubes"
    good = json.dumps({"object": "cube", "id": "imp", "name": "i"}).encode()
    return [
        Case("cube-create-missing-name", "POST", cb, 400, "Missing required parameter", "name",
             {"id": "x1"}),
        Case("cube-create-name-int", "POST", cb, 400, "valid string", "name", {"name": 1}),
        Case("cube-create-name-huge", "POST", cb, 400, "at most 200 characters", "name",
             {"name": LONG}),
        Case("cube-create-id-odd", "POST", cb, 400, "should match pattern", "id",
             {"name": "n", "id": "../etc/passwd"}),
        Case("cube-create-id-huge", "POST", cb, 400, "at most 128 characters", "id",
             {"name": "n", "id": "a" * 1000}),
        Case("cube-create-exists", "POST", cb, 400, f"Cube '{CUBE}' exists", "id",
             {"name": "again", "id": CUBE}),
        Case("cube-create-unknown-field", "POST", cb, 400, "Extra inputs are not permitted",
             "owner", {"name": "n", "owner": "alice"}),
        Case("cube-create-invalid-json", "POST", cb, 400, "not valid JSON", None,
             b"{'name': 'n'}", code="invalid_json"),
        Case("cube-create-invalid-utf8", "POST", cb, 400, "not valid UTF-8: byte 0xc0", None,
             b'{"name": "\xc0"}', code="invalid_json"),
        Case("cube-create-nested", "POST", cb, 400, "nested too deeply", None, NESTED,
             code="invalid_json"),
        Case("cube-create-description-int", "POST", cb, 400, "valid string", "description",
             {"name": "n", "description": 1}),
        Case("cube-get-unknown", "GET", f"{cb}/nope", 404, "No cube 'nope'", None),
        Case("cube-get-dotdot", "GET", f"{cb}/%2E%2E", 404, "No cube '..'", None),
        Case("cube-get-huge-id", "GET", f"{cb}/{'c' * 10_000}", 400, "at most 256 characters",
             "cube_id"),
        Case("cube-export-huge-id", "GET", f"{cb}/{'c' * 10_000}/export", 400,
             "at most 256 characters", "cube_id"),
        Case("cube-get-nul", "GET", f"{cb}/a%00b", 404, "No cube", None),
        Case("cube-delete-unknown", "DELETE", f"{cb}/nope", 404, "No cube 'nope'", None),
        Case("cube-export-unknown", "GET", f"{cb}/nope/export", 404, "No cube 'nope'", None),
        Case("cube-merge-unknown-target", "POST", f"{cb}/nope/merge", 404, "No cube 'nope'",
             None, {"source": CUBE}),
        Case("cube-merge-unknown-source", "POST", f"{cb}/{CUBE}/merge", 404, "No cube 'nope'",
             None, {"source": "nope"}),
        Case("cube-merge-missing-source", "POST", f"{cb}/{CUBE}/merge", 400,
             "Missing required parameter", "source", {}),
        Case("cube-merge-source-list", "POST", f"{cb}/{CUBE}/merge", 400, "valid string",
             "source", {"source": [CUBE]}),
        Case("cube-merge-source-huge", "POST", f"{cb}/{CUBE}/merge", 400,
             "at most 256 characters", "source", {"source": LONG}),
        Case("cube-merge-invalid-json", "POST", f"{cb}/{CUBE}/merge", 400, "not valid JSON",
             None, b"source=kb", code="invalid_json"),
        Case("cube-import-empty", "POST", f"{cb}/import", 400, "no cube line", None, b""),
        Case("cube-import-not-json", "POST", f"{cb}/import", 400, "line 1", None, b"hello"),
        Case("cube-import-invalid-utf8", "POST", f"{cb}/import", 400,
             "line 2: not valid UTF-8 (byte 0xff)", None,
             good + b"\n" + b'{"object": "memory", "text": "\xff"}'),
        Case("cube-import-nested", "POST", f"{cb}/import", 400, "nested too deeply", None,
             NESTED),
        Case("cube-import-absurd-numbers", "POST", f"{cb}/import", 400, "line 2", None,
             good + b"\n" + json.dumps({"object": "memory", "id": "m1", "cube_id": "imp",
                                        "user": "u", "text": "t", "version": 10**30,
                                        "created_at": 10**30}).encode()),
        Case("cube-import-array-line", "POST", f"{cb}/import", 400, "line 1", None, b"[1, 2]"),
        Case("cube-import-unknown-object", "POST", f"{cb}/import", 400, "unknown object", None,
             b'{"object": "wizard"}'),
        Case("cube-import-missing-object", "POST", f"{cb}/import", 400, "line 1", None,
             b'{"id": "x"}'),
        Case("cube-import-bad-memory", "POST", f"{cb}/import", 400, "line 2", None,
             good + b'\n{"object": "memory", "id": 5}'),
        Case("cube-import-foreign-memory", "POST", f"{cb}/import", 400,
             "every memory must belong", None,
             good + b"\n" + json.dumps({"object": "memory", "id": "m1", "cube_id": "other",
                                        "user": "u", "text": "t"}).encode()),
        Case("cube-import-other-tenant", "POST", f"{cb}/import", 400, "line 1", None,
             json.dumps({"object": "cube", "id": "imp", "name": "i", "tenant": "globex"}
                        ).encode()),
        Case("cube-import-over-limit", "POST", f"{cb}/import", 413, "larger than the limit",
             None, b"x" * TOO_BIG, code="payload_too_large"),
        Case("cube-put", "PUT", f"{cb}/{CUBE}", 405, "Method Not Allowed", None, {"name": "n"}),
        Case("cube-patch", "PATCH", cb, 405, "Method Not Allowed", None, {"name": "n"}),
    ]


def adapter_cases() -> list[Case]:
    a = "/v1/adapters"
    return [
        Case("adapters-list-tenant-key", "GET", a, 403, "Only admin keys", None),
        Case("adapter-put-tenant-key", "PUT", f"{a}/x", 403, "Only admin keys", None,
             {"upstream_model": "m"}),
        Case("adapter-put-empty", "PUT", f"{a}/x", 400, "needs `path`", "path", {}, key=ADMIN),
        Case("adapter-put-name-odd", "PUT", f"{a}/..%20x", 400, "Adapter names", "name",
             {"upstream_model": "m"}, key=ADMIN),
        Case("adapter-put-name-huge", "PUT", f"{a}/{'n' * 500}", 400, "Adapter names", "name",
             {"upstream_model": "m"}, key=ADMIN),
        Case("adapter-put-scale-string", "PUT", f"{a}/x", 400, "valid number", "scale",
             {"upstream_model": "m", "scale": "big"}, key=ADMIN),
        Case("adapter-put-scale-absurd", "PUT", f"{a}/x", 400, "less than or equal to 100",
             "scale", {"upstream_model": "m", "scale": 1e300}, key=ADMIN),
        Case("adapter-put-tenants-string", "PUT", f"{a}/x", 400, "valid list", "tenants",
             {"upstream_model": "m", "tenants": "acme"}, key=ADMIN),
        Case("adapter-put-tenants-ints", "PUT", f"{a}/x", 400, "valid string", "tenants.[0]",
             {"upstream_model": "m", "tenants": [1]}, key=ADMIN),
        Case("adapter-put-unknown-field", "PUT", f"{a}/x", 400,
             "Extra inputs are not permitted", "rank", {"upstream_model": "m", "rank": 8},
             key=ADMIN),
        Case("adapter-put-path-missing-file", "PUT", f"{a}/x", 400,
             "no file /nonexistent/no-such.gguf", "path", {"path": "/nonexistent/no-such.gguf"},
             key=ADMIN, code="invalid_adapter"),
        Case("adapter-put-path-not-gguf", "PUT", f"{a}/x", 400, "is not a GGUF file", "path",
             {"path": "/etc/hostname"}, key=ADMIN, code="invalid_adapter"),
        Case("adapter-put-path-dir", "PUT", f"{a}/x", 400, "is not a GGUF file", "path",
             {"path": "/"}, key=ADMIN, code="invalid_adapter"),
        Case("adapter-put-invalid-json", "PUT", f"{a}/x", 400, "not valid JSON", None, b"{",
             key=ADMIN, code="invalid_json"),
        Case("adapter-put-nested", "PUT", f"{a}/x", 400, "nested too deeply", None, NESTED,
             key=ADMIN, code="invalid_json"),
        Case("adapter-put-form", "PUT", f"{a}/x", 415, "Unsupported Content-Type", None,
             b"path=x", headers={"content-type": "application/x-www-form-urlencoded"},
             key=ADMIN),
        Case("adapter-delete-unknown", "DELETE", f"{a}/nope", 404, "No adapter 'nope'", None,
             key=ADMIN),
        Case("adapter-post", "POST", a, 405, "Method Not Allowed", None, {}, key=ADMIN),
    ]


def tenant_cases() -> list[Case]:
    t = "/v1/tenants"
    return [
        Case("tenants-list-tenant-key", "GET", t, 403, "Only admin keys", None),
        Case("tenant-get-unknown", "GET", f"{t}/nope", 404, "No tenant 'nope'", None, key=ADMIN,
             code="tenant_not_found"),
        Case("tenant-put-id-odd", "PUT", f"{t}/..%20x", 400, "Tenant ids are", "id",
             {"api_keys": ["sk-new-tenant-key-1"]}, key=ADMIN),
        Case("tenant-put-keys-missing", "PUT", f"{t}/newco", 400, "Missing required parameter",
             "api_keys", {}, key=ADMIN),
        Case("tenant-put-keys-string", "PUT", f"{t}/newco", 400, "valid list", "api_keys",
             {"api_keys": "sk-new"}, key=ADMIN),
        Case("tenant-put-rpm-negative", "PUT", f"{t}/newco", 400, "greater than or equal to 1",
             "rate_limit_rpm", {"api_keys": ["sk-new-tenant-key-1"], "rate_limit_rpm": -1},
             key=ADMIN),
        Case("tenant-put-invalid-json", "PUT", f"{t}/newco", 400, "not valid JSON", None, b"{",
             key=ADMIN, code="invalid_json"),
        Case("tenant-put-invalid-utf8", "PUT", f"{t}/newco", 400, "not valid UTF-8", None,
             b'{"api_keys": ["\xff"]}', key=ADMIN, code="invalid_json"),
        Case("tenant-put-nested", "PUT", f"{t}/newco", 400, "nested too deeply", None, NESTED,
             key=ADMIN, code="invalid_json"),
        Case("tenant-put-form", "PUT", f"{t}/newco", 415, "Unsupported Content-Type", None,
             b"api_keys=sk-new", headers={"content-type": "application/x-www-form-urlencoded"},
             key=ADMIN, code="unsupported_media_type"),
        Case("tenant-delete-unknown", "DELETE", f"{t}/nope", 404, "No tenant 'nope'", None,
             key=ADMIN),
    ]


def surface_cases() -> list[Case]:
    return [
        Case("models-post", "POST", "/v1/models", 405, "Method Not Allowed", None, {}),
        Case("models-no-key", "GET", "/v1/models", 401, "Missing API key", None, key=None),
        Case("models-bearer-huge", "GET", "/v1/models", 401, "Incorrect API key", None,
             headers={"authorization": f"Bearer {LONG}"}, key=None),
        Case("models-basic-auth", "GET", "/v1/models", 401, "Bearer", None,
             headers={"authorization": "Basic dXNlcjpwYXNz"}, key=None),
        Case("models-session-header-huge", "GET", "/v1/models", 400, "X-Memcube-Session",
             "x-memcube-session", headers={"x-memcube-session": LONG}, code="invalid_header"),
        Case("metrics-post", "POST", "/metrics", 405, "Method Not Allowed", None, {}),
        Case("metrics-no-key", "GET", "/metrics", 401, "Missing API key", None, key=None),
        Case("healthz-post", "POST", "/healthz", 405, "Method Not Allowed", None, {}),
        Case("healthz-delete", "DELETE", "/healthz", 405, "Method Not Allowed", None),
        Case("chat-get", "GET", "/v1/chat/completions", 405, "Method Not Allowed", None),
        Case("unknown-path", "GET", "/v1/nothing-here", 404, "Unknown path", None),
        Case("unknown-path-says-how-to-relay", "POST", "/v1/moderations", 404,
             "set `passthrough.api_base`", None, {"input": "hi"}),
        Case("unknown-path-no-key", "GET", "/v1/files", 401, "Missing API key", None, key=None),
        Case("unknown-path-huge", "GET", f"/v1/{'p' * 10_000}", 404,
             f"Unknown path: /v1/{'p' * 196}...", None),
        Case("flush-get", "GET", "/v1/memories/flush/now", 404, "Unknown path", None),
        Case("flush-user-header-huge", "POST", "/v1/memories/flush", 400, "X-Memcube-User",
             "x-memcube-user", headers={"x-memcube-user": LONG}, code="invalid_header"),
    ]


def embeddings_cases() -> list[Case]:
    e = "/v1/embeddings"
    minilm = "all-minilm-l6-v2"  # the embedded model, sharing memory's MiniLM here
    forms = "a string, a list of strings, a list of token ids or a list of lists of token ids"

    def c(id: str, status: int, says: str, param: str | None, body: Any, **kw: Any) -> Case:
        return Case(f"embeddings-{id}", "POST", e, status, says, param, body, **kw)

    def up(**fields: Any) -> dict[str, Any]:
        return {"model": "up", "input": "hi", **fields}

    return [
        c("invalid-json", 400, "not valid JSON", None, b'{"model": "up", "input": ',
          code="invalid_json"),
        c("empty-body", 400, "body is empty", None, b"", code="invalid_json"),
        c("array-body", 400, "JSON object", None, [up()], code="invalid_json"),
        c("nested", 400, "nested too deeply", None, NESTED, code="invalid_json"),
        c("form-content-type", 415, "Unsupported Content-Type", None, up(),
          headers={"content-type": "application/x-www-form-urlencoded"},
          code="unsupported_media_type"),
        c("missing-model", 400, "Missing required parameter", "model", {"input": "hi"}),
        c("missing-input", 400, "Missing required parameter", "input", {"model": "up"}),
        c("model-int", 400, "valid string", "model", up(model=3)),
        c("model-unknown", 404, "does not exist", "model", up(model="nope"),
          code="model_not_found"),
        c("input-int", 400, forms, "input", up(input=5)),
        c("input-null", 400, forms, "input", up(input=None)),
        c("input-object", 400, forms, "input", up(input={"text": "hi"})),
        c("input-empty-string", 400, "at least 1 character", "input", up(input="")),
        c("input-empty-list", 400, "at least 1 item", "input", up(input=[])),
        c("input-empty-string-in-list", 400, "at least 1 character", "input.[1]",
          up(input=["a", ""])),
        c("input-mixed", 400, "valid string", "input.[1]", up(input=["a", 1])),
        c("input-null-in-list", 400, "valid string", "input.[0]", up(input=[None])),
        c("token-negative", 400, "greater than or equal to 0", "input.[1]", up(input=[1, -1])),
        c("token-float", 400, "valid integer", "input.[1]", up(input=[1, 2.5])),
        c("token-bool", 400, "valid integer", "input.[0]", up(input=[True])),
        c("token-huge", 400, "less than or equal to 2147483647", "input.[0].[0]",
          up(input=[[10**30]])),
        c("token-list-empty", 400, "at least 1 item", "input.[1]", up(input=[[1], []])),
        c("token-lists-mixed", 400, "valid list", "input.[1]", up(input=[[1], "a"])),
        c("too-many-inputs", 400, "2049 inputs; at most 2048", "input", up(input=["a"] * 2049)),
        c("encoding-unknown", 400, "'float' or 'base64'", "encoding_format",
          up(encoding_format="int8")),
        c("dimensions-zero", 400, "greater than or equal to 1", "dimensions", up(dimensions=0)),
        c("dimensions-string", 400, "valid integer", "dimensions", up(dimensions="384")),
        c("user-huge", 400, "at most 256 characters", "user", up(user=LONG)),
        c("minilm-dimensions", 400, "384-dimensional vectors only, not 512", "dimensions",
          up(model=minilm, dimensions=512)),
        c("minilm-too-long", 400, "tokens long", "input.[1]",
          up(model=minilm, input=["fine", "word " * 300])),
        c("minilm-unknown-token", 400, "100256 is no token of cl100k_base", "input.[0].[1]",
          up(model=minilm, input=[[9906, 100256]])),
        c("over-limit", 413, "larger than the limit", None,
          b'{"model": "up", "input": "' + b"a" * TOO_BIG + b'"}', code="payload_too_large"),
        Case("embeddings-get", "GET", e, 405, "Method Not Allowed", None),
        c("no-key", 401, "Missing API key", None, up(), key=None),
    ]


CORPUS = [*chat_cases(stream=False), *chat_cases(stream=True), *memory_cases(), *cube_cases(),
          *adapter_cases(), *tenant_cases(), *surface_cases()]
CORPUS += embeddings_cases()


def completions_cases() -> list[Case]:
    p = "/v1/completions"

    def c(id: str, status: int, says: str, param: str | None, body: Any, **kw: Any) -> Case:
        return Case(f"completions-{id}", "POST", p, status, says, param, body, **kw)

    def up(**fields: Any) -> dict[str, Any]:
        return {"model": "up", "prompt": "hi", **fields}

    forms = "Input should be a valid string or a valid list"
    return [
        c("invalid-json", 400, "not valid JSON", None, b'{"model": "up", "prompt": ',
          code="invalid_json"),
        c("empty-body", 400, "body is empty", None, b"", code="invalid_json"),
        c("array-body", 400, "JSON object", None, [up()], code="invalid_json"),
        c("nested", 400, "nested too deeply", None, NESTED, code="invalid_json"),
        c("form-content-type", 415, "Unsupported Content-Type", None, up(),
          headers={"content-type": "application/x-www-form-urlencoded"},
          code="unsupported_media_type"),
        c("missing-model", 400, "Missing required parameter", "model", {"prompt": "hi"}),
        c("missing-prompt", 400, "Missing required parameter", "prompt", {"model": "up"}),
        c("model-unknown", 404, "does not exist", "model", up(model="nope"),
          code="model_not_found"),
        c("prompt-int", 400, forms, "prompt", up(prompt=5)),
        c("prompt-null", 400, forms, "prompt", up(prompt=None)),
        c("prompt-empty-list", 400, "at least 1 item", "prompt", up(prompt=[])),
        c("prompt-mixed", 400, "valid string", "prompt.[1]", up(prompt=["a", 1])),
        c("token-negative", 400, "greater than or equal to 0", "prompt.[1]",
          up(prompt=[1, -1])),
        c("token-list-empty", 400, "at least 1 item", "prompt.[1]", up(prompt=[[1], []])),
        c("too-many-prompts", 400, "at most 2048 items", "prompt", up(prompt=["a"] * 2049)),
        c("stream-string", 400, "valid boolean", "stream", up(stream="yes")),
        c("max-tokens-zero", 400, "greater than or equal to 1", "max_tokens",
          up(max_tokens=0)),
        c("echo-string", 400, "valid boolean", "echo", up(echo="yes")),
        c("suffix-int", 400, "valid string", "suffix", up(suffix=1)),
        c("logprobs-huge", 400, "less than or equal to 20", "logprobs", up(logprobs=21)),
        c("best-of-under-n", 400, "best_of must be greater than or equal to n", "best_of",
          up(n=3, best_of=2)),
        c("temperature-absurd", 400, "less than or equal to 2", "temperature",
          up(temperature=1e308)),
        c("user-huge", 400, "at most 256 characters", "user", up(user=LONG)),
        c("memory-unknown-key", 400, "Extra inputs are not permitted", "memory.recall",
          up(memory={"recall": True})),
        c("memory-with-token-ids", 400, "Memory needs the prompt as text", "prompt",
          up(prompt=[1, 2], memory={})),
        c("memory-cube-unknown", 404, "nope", "memory.cubes", up(memory={"cubes": ["nope"]})),
        c("over-limit", 413, "larger than the limit", None,
          b'{"model": "up", "prompt": "' + b"a" * TOO_BIG + b'"}', code="payload_too_large"),
        Case("completions-get", "GET", p, 405, "Method Not Allowed", None),
        c("no-key", 401, "Missing API key", None, up(), key=None),
    ]


def chat_rule_cases() -> list[Case]:
    """OpenAI's message rules, past the types (tests/test_chat_validation.py has them all)."""
    p = "/v1/chat/completions"
    user = {"role": "user", "content": "hi"}
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}

    def c(id: str, says: str, param: str, messages: list[Any]) -> Case:
        return Case(f"chat-rule-{id}", "POST", p, 400, says, param,
                    {"model": "up", "messages": messages})

    return [
        c("user-without-content", "Missing required parameter", "messages.[0].content",
          [{"role": "user"}]),
        c("system-content-null", "not null", "messages.[0].content",
          [{"role": "system", "content": None}, user]),
        c("tool-without-id", "Missing required parameter", "messages.[2].tool_call_id",
          [user, {"role": "assistant", "tool_calls": [call]}, {"role": "tool", "content": "x"}]),
        c("assistant-empty", "needs 'content' or 'tool_calls'", "messages.[1].content",
          [user, {"role": "assistant"}]),
        c("arguments-object", "valid string", "messages.[1].tool_calls.[0].function.arguments",
          [user, {"role": "assistant", "tool_calls": [
              {**call, "function": {"name": "f", "arguments": {}}}]}]),
        c("part-without-type", "Missing required parameter", "messages.[0].content.[0].type",
          [{"role": "user", "content": [{"text": "hi"}]}]),
    ]


CORPUS += completions_cases() + chat_rule_cases()


def responses_cases() -> list[Case]:
    r = "/v1/responses"

    def c(id: str, status: int, says: str, param: str | None, body: Any, **kw: Any) -> Case:
        return Case(f"responses-{id}", "POST", r, status, says, param, body, **kw)

    def up(**fields: Any) -> dict[str, Any]:
        return {"model": "up", "input": "hi", **fields}

    return [
        c("invalid-json", 400, "not valid JSON", None, b'{"model": "up", "input": ',
          code="invalid_json"),
        c("empty-body", 400, "body is empty", None, b"", code="invalid_json"),
        c("array-body", 400, "JSON object", None, [up()], code="invalid_json"),
        c("nested", 400, "nested too deeply", None, NESTED, code="invalid_json"),
        c("bad-utf8", 400, "not valid UTF-8", None, b'{"model": "up", "input": "caf\xc3\x28"}'),
        c("form-content-type", 415, "Unsupported Content-Type", None, up(),
          headers={"content-type": "text/plain"}, code="unsupported_media_type"),
        c("missing-model", 400, "Missing required parameter", "model", {"input": "hi"}),
        c("missing-input", 400, "Missing required parameter", "input", {"model": "up"}),
        c("model-unknown", 404, "does not exist", "model", up(model="nope"),
          code="model_not_found"),
        c("input-int", 400, "valid string", "input", up(input=5)),
        c("input-item-not-object", 400, "", "input.[0]", up(input=["hi"])),
        c("item-unknown-type", 400, "banana", "input.[0]", up(input=[{"type": "banana"}])),
        c("item-role", 400, "'user', 'assistant', 'system' or 'developer'", "input.[0].role",
          up(input=[{"role": "wizard", "content": "hi"}])),
        c("item-no-content", 400, "Missing required parameter", "input.[0].content",
          up(input=[{"role": "user"}])),
        c("part-unknown-type", 400, "", "input.[0].content.[0]",
          up(input=[{"role": "user", "content": [{"type": "video"}]}])),
        c("part-no-text", 400, "Missing required parameter", "input.[0].content.[0].text",
          up(input=[{"role": "user", "content": [{"type": "input_text"}]}])),
        c("file-part", 400, "not supported", "input.[0].content.[0].type",
          up(input=[{"role": "user", "content": [{"type": "input_file"}]}])),
        c("image-by-file-id", 400, "image_url", "input.[0].content.[0].file_id",
          up(input=[{"role": "user", "content": [{"type": "input_image", "file_id": "f"}]}])),
        c("call-no-call-id", 400, "Missing required parameter", "input.[0].call_id",
          up(input=[{"type": "function_call", "name": "f", "arguments": "{}"}])),
        c("call-arguments-object", 400, "valid string", "input.[0].arguments",
          up(input=[{"type": "function_call", "call_id": "c", "name": "f",
                     "arguments": {}}])),
        c("output-missing", 400, "Missing required parameter", "input.[0].output",
          up(input=[{"type": "function_call_output", "call_id": "c"}])),
        c("item-reference", 400, "not supported", "input.[0]",
          up(input=[{"type": "item_reference", "id": "msg_1"}])),
        c("tool-builtin", 400, "only function tools", "tools.[0].type",
          up(tools=[{"type": "web_search_preview"}])),
        c("tool-no-name", 400, "Missing required parameter", "tools.[0].name",
          up(tools=[{"type": "function"}])),
        c("tool-bad-name", 400, "pattern", "tools.[1].name",
          up(tools=[{"type": "function", "name": "ok"}, {"type": "function", "name": "a b"}])),
        c("tool-choice-bad", 400, "", "tool_choice", up(tool_choice="sometimes")),
        c("max-output-tokens-zero", 400, "greater than or equal to 1", "max_output_tokens",
          up(max_output_tokens=0)),
        c("max-output-tokens-huge", 400, "less than or equal to", "max_output_tokens",
          up(max_output_tokens=2**40)),
        c("temperature-high", 400, "less than or equal to 2", "temperature", up(temperature=9)),
        c("top-p-string", 400, "valid number", "top_p", up(top_p="high")),
        c("store-string", 400, "valid boolean", "store", up(store="yes")),
        c("stream-string", 400, "valid boolean", "stream", up(stream="yes")),
        c("metadata-too-many", 400, "at most 16", "metadata",
          up(metadata={f"k{i}": "v" for i in range(17)})),
        c("metadata-value-int", 400, "valid string", "metadata.k", up(metadata={"k": 1})),
        c("instructions-int", 400, "valid string", "instructions", up(instructions=5)),
        c("user-huge", 400, "at most 256 characters", "user", up(user=LONG)),
        c("format-no-schema", 400, "Missing required parameter", "text.format.schema",
          up(text={"format": {"type": "json_schema", "name": "x"}})),
        c("format-unknown", 400, "", "text.format.type", up(text={"format": {"type": "yaml"}})),
        c("previous-unknown", 404, "not found", "previous_response_id",
          up(previous_response_id="resp_nope"), code="previous_response_not_found"),
        c("previous-huge", 400, "at most 128 characters", "previous_response_id",
          up(previous_response_id=LONG)),
        c("memory-unknown-field", 400, "Extra inputs", "memory.bogus", up(memory={"bogus": 1})),
        c("memory-missing-cube", 404, "", "memory.cubes", up(memory={"cubes": ["missing"]})),
        Case("responses-get-unknown", "GET", f"{r}/resp_nope", 404, "not found", "response_id"),
        Case("responses-get-huge-id", "GET", f"{r}/{'x' * 300}", 400, "at most 128",
             "response_id"),
        Case("responses-delete-unknown", "DELETE", f"{r}/resp_nope", 404, "not found",
             "response_id"),
        Case("responses-items-unknown", "GET", f"{r}/resp_nope/input_items", 404, "not found",
             "response_id"),
        Case("responses-items-limit", "GET", f"{r}/resp_nope/input_items?limit=0", 400,
             "greater than or equal to 1", "limit"),
        Case("responses-items-order", "GET", f"{r}/resp_nope/input_items?order=up", 400,
             "'asc' or 'desc'", "order"),
        Case("responses-no-key", "POST", r, 401, "", None, up(), key=None),
    ]


CORPUS += responses_cases()
SENT: set[str] = set()  # ids of the cases sent so far


@dataclass
class Server:
    live: Live
    upstream: FakeUpstream
    memory_id: str
    upstream_calls: int  # after the fixture's own requests


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    data = tmp_path_factory.mktemp("bad-input")
    with FakeUpstream() as upstream:
        settings = Settings(
            data_dir=data / "data",
            models=[ModelConfig(name="up", backend="litellm", model="openai/fake-model",
                                api_base=upstream.url, max_retries=0)],
            auth=AuthSettings(enabled=True, admin_keys=[ADMIN]),
            tenants=[TenantConfig(id="acme", api_keys=[KEY])],
            max_body_bytes=LIMIT,
            memory=MemorySettings(embedder=EmbedderSettings(cache_dir=data / "models")),
        )
        with serve(create_app(settings)) as live:
            made = send(live, "POST", "/v1/cubes", body={"name": "kb", "id": CUBE})
            assert made.status_code == 200, made.text
            item = send(live, "POST", "/v1/memories",
                        body={"text": "The seed memory.", "user": "alice"})
            assert item.status_code == 200, item.text
            # One good exchange: the write-back path is known to work on this server.
            ok = send(live, "POST", "/v1/chat/completions", body={
                "model": "up", "messages": [{"role": "user", "content": "The good exchange."}],
                "user": "alice"})
            assert ok.status_code == 200, ok.text
            SENT.clear()
            yield Server(live, upstream, item.json()["id"], len(upstream.history))


def send(live: Live, method: str, path: str, *, body: Any = None,
         headers: dict[str, str] | None = None, key: str | None = KEY) -> httpx.Response:
    """``body`` goes as JSON unless it is bytes (as they are, still labelled JSON unless
    ``headers`` say otherwise); GET and DELETE without a body send none."""
    sent = {"authorization": f"Bearer {key}"} if key else {}
    content = None
    if isinstance(body, bytes) or body is not None or method not in ("GET", "DELETE"):
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        sent["content-type"] = "application/json"
    sent.update(headers or {})
    return httpx.request(method, f"{live.url}{path}", content=content, headers=sent,
                         timeout=60)


def send_case(server: Server, case: Case) -> httpx.Response:
    SENT.add(case.id)
    return send(server.live, case.method, case.path.replace(MEMORY, server.memory_id),
                body=case.body, headers=case.headers, key=case.key)


def assert_openai_error(r: httpx.Response, case: Case) -> None:
    assert r.status_code == case.status, r.text[:2000]
    assert r.headers["content-type"] == "application/json", r.headers
    assert len(r.headers["x-memcube-request-id"]) == 32
    body = r.json()
    assert set(body) == {"error"}, body
    err: dict[str, Any] = body["error"]
    assert set(err) == ERROR_KEYS, err
    assert err["type"] == (case.type or TYPES[case.status]), err
    assert isinstance(err["message"], str) and case.says in err["message"], err
    assert len(err["message"]) < 1000, "an error never echoes a huge input back"
    assert err["param"] == case.param, err
    if case.code is not None:
        assert err["code"] == case.code, err


@pytest.mark.parametrize("case", CORPUS, ids=[c.id for c in CORPUS])
def test_bad_request_gets_a_useful_4xx_and_the_server_lives_on(server: Server,
                                                                case: Case) -> None:
    assert_openai_error(send_case(server, case), case)
    alive = httpx.get(f"{server.live.url}/healthz", timeout=10)
    assert alive.status_code == 200 and alive.json()["status"] == "ok"


@pytest.mark.parametrize(("path", "key"), [
    ("/v1/chat/completions", KEY), ("/v1/memories", KEY), ("/v1/memories/search", KEY),
    ("/v1/cubes", KEY), ("/v1/cubes/import", KEY), (f"/v1/cubes/{CUBE}/merge", KEY),
    ("/v1/adapters/x", ADMIN), ("/v1/tenants/newco", ADMIN)])
def test_chunked_body_over_the_limit_is_413_wherever_a_body_is_read(server: Server, path: str,
                                                                    key: str) -> None:
    """No content-length to refuse up front: the limit holds while the body streams in,
    and the route reading it answers 413, not a parse error."""
    def chunks() -> Iterator[bytes]:
        yield b'{"text": "'
        for _ in range(TOO_BIG // 65536):
            yield b"a" * 65536
        yield b'"}'

    method = "PUT" if path.startswith(("/v1/adapters", "/v1/tenants")) else "POST"
    r = httpx.request(method, f"{server.live.url}{path}", content=chunks(), timeout=60,
                      headers={"authorization": f"Bearer {key}",
                               "content-type": "application/json"})
    assert_openai_error(r, Case(path, method, path, 413, "larger than the limit of 2097152",
                                code="payload_too_large"))


def send_the_rest(server: Server) -> None:
    """The checks below hold for the whole corpus, even when only they were selected."""
    for case in CORPUS:
        if case.id not in SENT:
            with contextlib.suppress(httpx.RemoteProtocolError):  # judged by the test above
                send_case(server, case)


def test_no_bad_request_stored_a_memory_a_cube_or_an_adapter(server: Server) -> None:
    send_the_rest(server)
    live = server.live
    flushed = send(live, "POST", "/v1/memories/flush")
    assert flushed.json() == {"object": "memory.flush", "flushed": True}
    mine = send(live, "GET", "/v1/memories?limit=1000&status=all").json()["data"]
    assert sorted((m["text"], m["version"], m["status"]) for m in mine) == [
        ("The good exchange.", 1, "active"), ("The seed memory.", 1, "active")]
    # The admin key is tenant 'default': nothing may have landed there either.
    assert send(live, "GET", "/v1/memories?limit=1000&status=all", key=ADMIN,
                headers={"x-memcube-tenant": "default"}).json()["data"] == []
    history = send(live, "GET", f"/v1/memories/{server.memory_id}/history").json()["data"]
    assert [v["version"] for v in history] == [1]  # no bad PATCH made a version
    cubes = send(live, "GET", "/v1/cubes").json()["data"]
    assert sorted((c["id"] == CUBE, c["kind"], c["owner"]) for c in cubes) == [
        (False, "user", "alice"), (False, "user", "default"), (True, "shared", None)]
    assert send(live, "GET", "/v1/cubes", key=ADMIN,
                headers={"x-memcube-tenant": "default"}).json()["data"] == []
    assert send(live, "GET", "/v1/adapters", key=ADMIN).json()["data"] == []
    tenants = send(live, "GET", "/v1/tenants", key=ADMIN).json()["data"]
    assert [t["id"] for t in tenants] == ["acme"]


def test_no_bad_request_reached_the_upstream(server: Server) -> None:
    send_the_rest(server)
    assert [r.body["messages"][-1]["content"] for r in server.upstream.history] == [
        "The good exchange."]
