"""The route of ``POST /v1/chat/completions``: authenticate, check the body's type,
serve (:mod:`proxy.chat.serving`)."""

from __future__ import annotations

from starlette.routing import Route

from proxy.auth import json_post_route
from proxy.chat.serving import ChatServing
from proxy.context import AppContext


def chat_route(context: AppContext) -> Route:
    return json_post_route("/v1/chat/completions", ChatServing(context).handle)
