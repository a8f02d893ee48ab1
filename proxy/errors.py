"""Errors and the one factory that turns every failure into an OpenAI-style body.

Every failure leaves the proxy as ``{"error": {"message", "type", "param", "code"}}``
with an HTTP status. The tree::

    ProxyError                      500 api_error
    ├── InvalidRequestError         400 invalid_request_error
    │   ├── PayloadTooLargeError    413 invalid_request_error
    │   └── UnsupportedMediaError   415 invalid_request_error
    ├── AuthenticationError         401 authentication_error
    ├── PermissionDeniedError       403 permission_error
    ├── NotFoundError               404 not_found_error
    │   └── ModelNotFoundError      404 not_found_error, code model_not_found
    ├── ConflictError               409 conflict_error
    ├── RateLimitError              429 rate_limit_error, with Retry-After
    ├── MemoryUnavailableError      503 api_error, code memory_unavailable
    └── UpstreamError               502 api_error (5xx and malformed replies)
        ├── UpstreamStatusError     the upstream's own 4xx, kept
        ├── UpstreamTimeoutError    504
        └── UpstreamUnavailableError 502, connection refused or reset

The memory layer raises its own errors (``memory.errors``), which know nothing of
HTTP; :func:`from_memory_error` is the one place they become these.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.responses import Response

from memory.errors import InvalidMemoryRequest, MemoryLayerError, MemoryNotFound, MemoryUnavailable

# OpenAI's error types by HTTP status, for statuses that come from elsewhere (an upstream).
_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}


def error_type_for_status(status: int) -> str:
    return _TYPE_BY_STATUS.get(status, "invalid_request_error" if status < 500 else "api_error")


class ProxyError(Exception):
    status: int = 500
    type: str = "api_error"
    code: str | None = None
    headers: dict[str, str] | None = None  # sent with the error response

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        status: int | None = None,
        type: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        if type is not None:
            self.type = type

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


class InvalidRequestError(ProxyError):
    status = 400
    type = "invalid_request_error"


class PayloadTooLargeError(InvalidRequestError):
    status = 413
    code = "payload_too_large"


class UnsupportedMediaError(InvalidRequestError):
    status = 415
    code = "unsupported_media_type"


class AuthenticationError(ProxyError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class PermissionDeniedError(ProxyError):
    status = 403
    type = "permission_error"
    code = "insufficient_permissions"


class RateLimitError(ProxyError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message)
        # Whole seconds, as RFC 9110 has it; the openai SDK waits this long before a retry.
        self.headers = {"retry-after": str(retry_after)}


class NotFoundError(ProxyError):
    status = 404
    type = "not_found_error"


class ModelNotFoundError(NotFoundError):
    code = "model_not_found"

    def __init__(self, model: str) -> None:
        shown = model if len(model) <= 200 else f"{model[:200]}..."  # never echo 100 KB
        super().__init__(f"The model '{shown}' does not exist", param="model")


class ConflictError(ProxyError):
    status = 409
    type = "conflict_error"


class MemoryUnavailableError(ProxyError):
    """The memory store (or the embedder) cannot serve now; retrying later may succeed."""

    status = 503
    code = "memory_unavailable"


def from_memory_error(exc: MemoryLayerError) -> ProxyError:
    if isinstance(exc, MemoryNotFound):
        return NotFoundError(exc.message, param=exc.param)
    if isinstance(exc, InvalidMemoryRequest):
        return InvalidRequestError(exc.message, param=exc.param)
    if isinstance(exc, MemoryUnavailable):
        return MemoryUnavailableError(exc.message)
    return ProxyError(exc.message)


class UpstreamError(ProxyError):
    status = 502
    type = "api_error"
    code = "upstream_error"


class UpstreamStatusError(UpstreamError):
    """The upstream answered 4xx: the client's request was at fault, so the status is kept."""

    def __init__(self, status: int, message: str, *, code: str | None = None,
                 param: str | None = None) -> None:
        super().__init__(message, status=status, type=error_type_for_status(status),
                         code=code or "upstream_error", param=param)


class UpstreamTimeoutError(UpstreamError):
    status = 504
    code = "upstream_timeout"


class UpstreamUnavailableError(UpstreamError):
    code = "upstream_unavailable"


def error_body(
    message: str, type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(exc: ProxyError, headers: dict[str, str] | None = None) -> Response:
    if exc.headers:
        headers = {**exc.headers, **(headers or {})}
    return Response(
        content=json.dumps(exc.body()),
        status_code=exc.status,
        media_type="application/json",
        headers=headers,
    )


def upstream_error_from_status(status: int, payload: bytes) -> UpstreamError:
    """Map an upstream's non-2xx reply: 4xx keeps its status, anything else is a 502."""
    message, code, param = _upstream_error_fields(payload)
    if 400 <= status < 500:
        return UpstreamStatusError(status, message or f"upstream returned HTTP {status}",
                                   code=code, param=param)
    return UpstreamError(message or f"upstream returned HTTP {status}")


def _upstream_error_fields(payload: bytes) -> tuple[str | None, str | None, str | None]:
    try:
        data = json.loads(payload)
    except ValueError:
        return None, None, None
    err = data.get("error") if isinstance(data, dict) else None
    if isinstance(err, dict):
        msg = err.get("message")
        code = err.get("code")
        param = err.get("param")
        return (
            f"upstream: {msg}" if isinstance(msg, str) else None,
            code if isinstance(code, str) else None,
            param if isinstance(param, str) else None,
        )
    if isinstance(err, str):
        return f"upstream: {err}", None, None
    return None, None, None
