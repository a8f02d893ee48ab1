"""The route of ``POST /v1/chat/completions``: authenticate, check the body's type,
serve (:mod:`proxy.chat.serving`)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from proxy.auth import authenticate
from proxy.chat.serving import ChatServing
from proxy.context import AppContext
from proxy.protocol import check_json_content_type


def chat_route(context: AppContext) -> Route:
    """The hot path, mounted as a plain Starlette route: FastAPI's dependency
    resolution cost more per request than the rest of the relay (bench/overhead.py)."""
    serving = ChatServing(context)

    async def chat_completions(request: Request) -> Response:
        authenticate(request)
        check_json_content_type(request.headers.get("content-type"))
        return await serving.handle(request)

    return Route("/v1/chat/completions", chat_completions, methods=["POST"])
