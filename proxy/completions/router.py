"""The route of ``POST /v1/completions``: authenticate, check the body's type, serve
(:mod:`proxy.completions.serving`)."""

from __future__ import annotations

from starlette.routing import Route

from proxy.auth import json_post_route
from proxy.completions.serving import CompletionsServing
from proxy.context import AppContext


def completions_route(context: AppContext) -> Route:
    return json_post_route("/v1/completions", CompletionsServing(context).handle)
