"""The proxy's own HTTP header names, in one place (lower case, as ASGI carries them).

Request headers say who a request is for; response headers say what memory did for it.
They are part of the external contract (README, "Using it" and "API").
"""

from __future__ import annotations

# -- request --------------------------------------------------------------------------------
#: The end user a request is for (else the body's ``user``; else none: see
#: ``memory.anonymous``).
USER = "x-memcube-user"
#: A session id, kept with every memory written from the request.
SESSION = "x-memcube-session"
#: An admin key acting for a tenant.
TENANT = "x-memcube-tenant"

# -- response -------------------------------------------------------------------------------
REQUEST_ID = "x-memcube-request-id"
#: Ids of the memories injected, comma separated.
MEMORIES = "x-memcube-memories"
#: ``hit``, ``miss`` or ``none``: whether the activation block's saved state was restored.
ACTIVATION = "x-memcube-activation"
#: The adapter (parametric memory) a request ran with.
ADAPTER = "x-memcube-adapter"
#: What memory could not do for a request (``memory.layer``'s names), comma separated.
DEGRADED = "x-memcube-degraded"
#: What memory was asked to do: ``on``, ``recall-only``, ``write-only``, ``off``, or
#: ``anonymous`` (the request named no user and ``memory.anonymous`` is ``off``).
MEMORY = "x-memcube-memory"
#: The model name the upstream reported, where it differs from the one the client sent
#: (which the response carries).
UPSTREAM_MODEL = "x-memcube-upstream-model"

#: Headers whose value names a user or session: bounded in length like every id.
ID_HEADERS = {USER: "X-Memcube-User", SESSION: "X-Memcube-Session"}
