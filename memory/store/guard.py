"""One meaning for a store failure: :class:`memory.errors.MemoryUnavailable`.

Each backend fails its own way: Qdrant Edge's binding raises bare ``Exception``,
qdrant-client raises its HTTP and gRPC errors, a full or read-only disk raises
``OSError``. Callers should not have to know which: chat answers without memory,
the memory API answers 503, and the write-back worker waits for the store instead
of counting the failure against the exchange. So every call goes through this
wrapper, which lets programming errors and bad arguments through as they are
(a cursor that does not parse is the caller's ``ValueError``; a bug stays a bug)
and turns everything else into ``MemoryUnavailable``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

from memory.errors import MemoryLayerError, MemoryUnavailable
from memory.store.wrapper import Kind, WrappedStore

log = logging.getLogger(__name__)

T = TypeVar("T")

# Raised by our own code for bad input or bugs, never by a store being unable to serve.
_NOT_OUTAGES = (MemoryLayerError, ValueError, TypeError, LookupError, AttributeError,
                AssertionError, NotImplementedError)


def is_outage(exc: BaseException) -> bool:
    return isinstance(exc, Exception) and not isinstance(exc, _NOT_OUTAGES)


class GuardedStore(WrappedStore):
    def _call(self, kind: Kind, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        try:
            return fn(*args, **kwargs)
        except MemoryUnavailable:
            raise
        except Exception as exc:
            if not is_outage(exc):
                raise
            # The message names the failure's type only: store errors can quote payloads.
            raise MemoryUnavailable(
                f"The memory store is unavailable ({type(exc).__name__}); "
                "try again later.") from exc

    def __getattr__(self, name: str) -> Any:
        # Backend extras (EdgeStore.optimize) stay reachable, unguarded.
        return getattr(self.inner, name)
