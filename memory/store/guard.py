"""One meaning for a store failure: :class:`memory.errors.MemoryUnavailable`, given fast.

Each backend fails its own way: Qdrant Edge's binding raises bare ``Exception``,
qdrant-client raises its HTTP and gRPC errors, a full or read-only disk raises
``OSError``. Callers should not have to know which: chat answers without memory,
the memory API answers 503, and the write-back worker waits for the store instead
of counting the failure against the exchange. So every call goes through this
wrapper, which lets programming errors and bad arguments through as they are
(a cursor that does not parse is the caller's ``ValueError``; a bug stays a bug)
and turns everything else into ``MemoryUnavailable``.

Once a call has failed as an outage, later calls fail at once, without trying the
store (which may take a client timeout each), until a pause is over: then one call
goes through to test the water, and the pause grows (up to ``RETRY_MAX_S``) while
the store stays down. A failed write stops writes only: a read-only disk still
serves reads. ``probe`` always reaches the store (the write-back worker uses it to
learn the store is back), and its success ends the outage at once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Literal, TypeVar

from memory.errors import MemoryLayerError, MemoryUnavailable
from memory.store.base import MemoryStore
from memory.store.wrapper import Kind, WrappedStore

log = logging.getLogger(__name__)

T = TypeVar("T")

# Raised by our own code for bad input or bugs, never by a store being unable to serve.
_NOT_OUTAGES = (MemoryLayerError, ValueError, TypeError, LookupError, AttributeError,
                AssertionError, NotImplementedError)
#: The pause after a failure, doubling after each failed retry up to the cap (like
#: the write-back worker's probes, ``memory.outbox.OUTAGE_PROBE_MAX_S``).
RETRY_FIRST_S = 0.25
RETRY_MAX_S = 10.0

#: What an outage stops: every call (reads failed), or writes alone.
Stopped = Literal["all", "writes"]


def is_outage(exc: BaseException) -> bool:
    return isinstance(exc, Exception) and not isinstance(exc, _NOT_OUTAGES)


def _unavailable(cause: str) -> MemoryUnavailable:
    # The message names the failure's type only: store errors can quote payloads.
    return MemoryUnavailable(f"The memory store is unavailable ({cause}); try again later.")


class GuardedStore(WrappedStore):
    def __init__(self, inner: MemoryStore, *, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(inner)
        self.clock = clock
        self._state_lock = threading.Lock()
        #: None while the store serves; else what the outage stops.
        self._stopped: Stopped | None = None
        self._cause = ""  # the type of the failure that started or prolonged the outage
        self._pause = 0.0
        self._retry_at = 0.0
        self._testing = False  # a call is testing the water now

    def _call(self, kind: Kind, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        trial = False
        if self._stopped is not None:  # unlocked: the common case costs no lock
            trial = self._admit(kind)
        try:
            result = fn(*args, **kwargs)
        except Exception as exc:
            failure = self._failure(kind, exc, trial)
            if failure is exc:
                raise
            raise failure from exc
        if trial:
            self._recovered()
        return result

    def probe(self) -> None:
        """Always asks the store: this is how the write-back worker learns it is back."""
        try:
            self.inner.probe()
        except Exception as exc:
            failure = self._failure("write", exc, trial=False)
            if failure is exc:
                raise
            raise failure from exc
        if self._stopped is not None:
            self._recovered()

    # -- the outage's state ---------------------------------------------------------------

    def _admit(self, kind: Kind) -> bool:
        """Whether this call tests the water (True), goes through as usual (False), or
        fails at once (raises)."""
        with self._state_lock:
            stopped = self._stopped
            if stopped is None or (stopped == "writes" and kind == "read"):
                return False
            if self._testing or self.clock() < self._retry_at:
                raise _unavailable(self._cause)
            self._testing = True
            return True

    def _failure(self, kind: Kind, exc: Exception, trial: bool) -> Exception:
        """What a failed call raises; an outage also starts or prolongs the stop."""
        outage = isinstance(exc, MemoryUnavailable) or is_outage(exc)
        with self._state_lock:
            if trial:
                self._testing = False
            if outage:
                self._stop(kind, type(exc).__name__, trial)
        if not outage or isinstance(exc, MemoryUnavailable):
            return exc  # the caller's mistake stays its own; a bug stays a bug
        return _unavailable(type(exc).__name__)

    def _stop(self, kind: Kind, cause: str, trial: bool) -> None:
        stopped: Stopped = "all" if kind == "read" or self._stopped == "all" else "writes"
        if self._stopped is None:
            self._pause = RETRY_FIRST_S
            log.warning("memory store unavailable (%s): failing calls fast, retrying in %.2f s",
                        cause, self._pause)
        elif trial:
            self._pause = min(RETRY_MAX_S, self._pause * 2)
        elif stopped == self._stopped:
            return  # a call begun before the outage was known: nothing new
        self._stopped, self._cause = stopped, cause
        self._retry_at = self.clock() + self._pause

    def _recovered(self) -> None:
        """A call the outage stops worked (a trial, or a probe): the store is back."""
        with self._state_lock:
            if self._stopped is not None:
                log.info("memory store available again")
            self._stopped, self._pause, self._testing = None, 0.0, False

    def __getattr__(self, name: str) -> Any:
        # Backend extras (EdgeStore.optimize) stay reachable, unguarded.
        return getattr(self.inner, name)
