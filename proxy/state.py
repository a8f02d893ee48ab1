"""What the proxy knows about one request while serving it: a typed record kept in the
ASGI scope, shared by the middleware (ids, metrics, logs), auth and the endpoints.

Starlette's ``request.state`` is a string-keyed dict any module may write; here the one
key holds a :class:`RequestState`, so every field has a name, a type and a meaning.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.types import Scope

if TYPE_CHECKING:
    from proxy.auth import Principal

_KEY = "memcube"


@dataclass(slots=True)
class RequestState:
    request_id: str
    #: Who is calling, once authenticated.
    principal: Principal | None = None
    #: The ``model`` the request named (a metrics label).
    model: str = ""
    #: What memory could not do for the request (``X-Memcube-Degraded``).
    degraded: list[str] = field(default_factory=list)
    #: Keep a record of what memory did for it (``X-Memcube-Debug``, proxy/traces.py).
    debug: bool = False
    #: The OpenAI error type the request ended with, mid-stream failures included.
    error_type: str | None = None


def attach(scope: Scope, state: RequestState) -> None:
    scope.setdefault("state", {})[_KEY] = state


def request_state(request: Request | Scope) -> RequestState:
    """The request's state; the middleware attaches one to every HTTP request."""
    scope = request.scope if isinstance(request, Request) else request
    found = scope.get("state", {}).get(_KEY)
    if found is None:  # an app built without the middleware (unit tests)
        found = RequestState(request_id="-")
        attach(scope, found)
    assert isinstance(found, RequestState)
    return found
