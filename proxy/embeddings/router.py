"""The route of ``POST /v1/embeddings``: authenticate, check the body's type, and
embed with the model named: the embedded MiniLM (:mod:`proxy.embeddings.local`), or a
configured upstream model's embeddings, relayed by its backend.

Embeddings never touch memory: nothing is recalled for them and nothing is remembered.
"""

from __future__ import annotations

import json

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from proxy.auth import json_post_route
from proxy.context import AppContext
from proxy.embeddings.protocol import parse_embeddings_request
from proxy.errors import InvalidRequestError
from proxy.headers import UPSTREAM_MODEL
from proxy.naming import rename
from proxy.state import request_state


def embeddings_route(context: AppContext) -> Route:
    """A plain Starlette route, like chat's: no FastAPI dependency resolution per request."""
    local = context.embeddings
    max_inputs = context.settings.embeddings.max_inputs

    async def embeddings(request: Request) -> Response:
        body, req = parse_embeddings_request(await request.body(), max_inputs=max_inputs)
        state = request_state(request)
        if local is not None and req.model == local.name:
            state.model = req.model
            return Response(await local.create(req), media_type="application/json")
        backend = context.backend(req.model)
        state.model = req.model
        if not backend.serves_embeddings:
            hint = f"; the embedded embeddings model is '{local.name}'" if local else ""
            raise InvalidRequestError(f"The model '{req.model}' serves no embeddings{hint}.",
                                      param="model", code="model_not_supported")
        reply = await backend.embeddings(body)
        raw, upstream = rename(reply.data, reply.raw, req.model)
        content = raw if raw is not None else json.dumps(reply.data).encode()
        named = {UPSTREAM_MODEL: upstream} if upstream is not None else None
        return Response(content, media_type="application/json", headers=named)

    return json_post_route("/v1/embeddings", embeddings)
