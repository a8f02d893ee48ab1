"""The write-back worker: drains the outbox into the memory layer, surviving its outages.

Job: hand every exchange in a :class:`memory.outbox.Outbox` to a batch handler, in seq
order and in batches, on the running event loop. Guarantee: an exchange leaves the
outbox only when the handler succeeded with it (it is acked) or it failed
``max_attempts`` times on its own (it is dead-lettered, with its error); a failure met
while the destination is down (the store or the embedder, confirmed by a probe) never
counts against it. The outbox keeps exchanges durable; this module decides when they
are done.

:meth:`WriteBackWorker.flush` waits on a watermark: everything appended before the
call has ``seq <= Outbox.last_seq()``, so later appends do not hold it up.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from typing import Any, TypeVar

from memory.errors import MemoryUnavailable
from memory.layer import Exchange
from memory.outbox import Outbox

log = logging.getLogger(__name__)

Handler = Callable[[list[Exchange]], Awaitable[None]]
Backoff = Callable[[int], float]
#: Raises when the handler's destination (the store, the embedder) cannot take writes now.
Probe = Callable[[], Awaitable[None]]

#: Longest wait between two probes of a destination that is down, in seconds.
OUTAGE_PROBE_MAX_S = 10.0
T = TypeVar("T")


def exponential_backoff(attempts: int, *, base: float = 1.0, cap: float = 300.0) -> float:
    """Delay before retry number ``attempts`` (1-based): 1s, 2s, 4s ... up to ``cap``."""
    return float(min(cap, base * 2 ** max(0, attempts - 1)))


class WriteBackWorker:
    """Drains an :class:`Outbox` into a batch handler, on the running event loop.

    The handler gets up to ``batch_size`` exchanges in seq order. If a batch raises,
    its items are retried one by one at once, so a single poison exchange cannot hold
    back the others; each single failure counts an attempt and waits ``backoff``, and
    an exchange failing ``max_attempts`` times goes to the dead table. An exchange that
    has failed alone stays a suspect and is only ever handled alone afterwards, so it
    cannot sink a fresh batch on each retry.

    Only a :class:`MemoryUnavailable` from the handler may be the destination's (the
    store wrapper raises it for every store failure, the remote embedder when its
    API cannot serve); any other exception is the exchange's (a bug, a bad exchange)
    and counts against it at once, without a probe. A ``MemoryUnavailable`` is held
    against the exchange only when ``probe`` then says the destination is fine. When
    the probe fails too, or there is no probe, the destination is down (an outage,
    not a bad exchange): nothing is counted, the worker stops taking batches, and
    probes again with growing pauses (up to ``OUTAGE_PROBE_MAX_S``; at once when a
    flush asks) until the destination answers, then carries on where it stopped.
    """

    def __init__(self, outbox: Outbox, handle: Handler, *, batch_size: int = 64,
                 max_attempts: int = 5, backoff: Backoff = exponential_backoff,
                 probe: Probe | None = None) -> None:
        self.outbox = outbox
        self.handle = handle
        self.batch_size = batch_size
        self.max_attempts = max_attempts
        self.backoff = backoff
        self.probe = probe
        #: True while the destination is down and write-back waits for it.
        self.outage = False
        self._failed_probes = 0  # ever: a flush compares it with what it saw at its start
        self._probe_now: asyncio.Event | None = None
        # Loop-bound primitives are made in start(), on the loop that will use them.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._progress: asyncio.Condition | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        # Every seq below this has been handled (acked or dead); None until first measured.
        self._low_water: int | None = None
        self._suspects: set[int] = set()
        # One thread of its own, so write-back keeps pace when recall work fills the
        # default pool (bench/load.py: the backlog grew for as long as load lasted).
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="write-back")

    async def run_blocking(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on the worker's own thread (handlers use it for their writes)."""
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    def close(self) -> None:
        self._thread.shutdown(wait=True)

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        """Start draining, beginning with whatever a previous process left behind."""
        if self.running:
            return
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._probe_now = asyncio.Event()
        self._progress = asyncio.Condition()
        self._stopping = False
        self._low_water = None
        self._task = self._loop.create_task(self._run(), name="outbox-writeback")

    async def stop(self, timeout: float | None = None) -> None:
        """Finish the batch in hand and stop; the rest stays in the outbox for next time.

        Past ``timeout`` the batch is cancelled; it is replayed on the next start
        (``timeout=0``: at once, for handlers that may take minutes).
        """
        task = self._task
        if task is None:
            return
        self._stopping = True
        self.notify()
        self._probe_soon()
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout)
        except TimeoutError:
            task.cancel()
            with suppress(asyncio.CancelledError):
                await task
            if timeout:
                log.warning("outbox worker cancelled after %ss; its batch will be replayed",
                            timeout)
            else:
                log.info("outbox worker stopped; a batch in hand will be replayed")
        finally:
            self._task = None
            await self._announce()

    def notify(self) -> None:
        """Wake the worker (after an append). Safe from any thread."""
        loop, wake = self._loop, self._wake
        if loop is None or wake is None or loop.is_closed():
            return
        try:
            current = asyncio.get_running_loop()
        except RuntimeError:
            current = None
        if current is loop:
            wake.set()
        else:
            with suppress(RuntimeError):  # the loop closed under us: nothing left to wake
                loop.call_soon_threadsafe(wake.set)

    def _probe_soon(self) -> None:
        """End an outage's pause now (a flush wants an answer). On the worker's loop."""
        if self._probe_now is not None:
            self._probe_now.set()

    async def flush(self, timeout: float | None = None) -> None:
        """Return once every exchange appended before this call is acked or dead.

        Appends made while waiting do not hold it up: it waits on the seq watermark
        taken when the coroutine starts, not on the outbox being empty. Raises
        ``TimeoutError`` past ``timeout``, ``RuntimeError`` if the worker is not
        running or stops first, and :class:`MemoryUnavailable` when the destination is
        down (a probe made after this call failed): waiting for it could take hours.
        """
        target = self.outbox.last_seq()
        if not self.running or self._progress is None:
            raise RuntimeError("the write-back worker is not running")
        progress = self._progress
        failed_before = self._failed_probes
        self.notify()
        self._probe_soon()

        def reached() -> bool:
            return self._low_water is not None and self._low_water > target

        def down() -> bool:
            return self._failed_probes > failed_before

        async with asyncio.timeout(timeout), progress:
            await progress.wait_for(lambda: reached() or down() or not self.running)
        if reached():
            return
        if down():
            pending = await self.run_blocking(self.outbox.pending_count)
            raise MemoryUnavailable(
                f"The memory store or embedder is unavailable: {pending} exchanges wait in "
                "the outbox and will be written back when it returns; try the flush again later.")
        raise RuntimeError("the write-back worker stopped before the flush completed")

    # -- the loop ---------------------------------------------------------------------

    async def _run(self) -> None:
        assert self._wake is not None
        failures = 0
        while not self._stopping:
            # Cleared before claiming, so a notify() during the claim is not lost.
            self._wake.clear()
            batch: list[tuple[int, Exchange]] = []
            try:
                batch = await self.run_blocking(self.outbox.claim, self.batch_size)
                if batch:
                    await self._process(batch)
                await self._measure()
                wait = None if batch else await self.run_blocking(self.outbox.next_due_in)
                failures = 0
            except _DestinationDown:
                await self._measure_quietly()
                await self._wait_out_outage()
                continue
            except Exception:
                # The outbox itself failed (disk, closed): back off rather than spin.
                failures += 1
                wait = exponential_backoff(failures, base=0.1, cap=5.0)
                log.exception("outbox worker iteration failed (%s in a row)", failures)
            if batch and wait is None:
                continue  # more may be due right away
            with suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait)

    async def _process(self, batch: list[tuple[int, Exchange]]) -> None:
        run: list[tuple[int, Exchange]] = []
        for item in batch:
            if item[0] in self._suspects:
                await self._handle_run(run)
                run = []
                await self._handle_run([item])
            else:
                run.append(item)
        await self._handle_run(run)

    async def _handle_run(self, run: list[tuple[int, Exchange]]) -> None:
        if not run:
            return
        try:
            await self.handle([exchange for _, exchange in run])
        except Exception as exc:
            await self._check_destination(exc)
            if len(run) == 1:
                await self._failed(*run[0], exc)
                return
            log.warning("write-back batch of %s failed (%s); retrying one by one",
                        len(run), type(exc).__name__)
            for seq, exchange in run:
                if self._stopping:
                    return  # the rest stays due and is retried on the next start
                try:
                    await self.handle([exchange])
                except Exception as item_exc:
                    await self._check_destination(item_exc)
                    await self._failed(seq, exchange, item_exc)
                else:
                    await self.run_blocking(self.outbox.ack, [seq])
            return
        await self.run_blocking(self.outbox.ack, [seq for seq, _ in run])
        self._suspects.difference_update(seq for seq, _ in run)

    async def _check_destination(self, exc: Exception) -> None:
        """Raise :class:`_DestinationDown` when the failure is the destination's, so that
        it is not counted against the exchange."""
        if not isinstance(exc, MemoryUnavailable):
            return  # a bug or a bad exchange: asking the store would tell us nothing
        if self.probe is None:
            self._failed_probes += 1
            raise _DestinationDown from exc
        try:
            await self.probe()
        except Exception as probe_exc:
            self._failed_probes += 1
            raise _DestinationDown from probe_exc

    async def _wait_out_outage(self) -> None:
        assert self._probe_now is not None
        self.outage = True
        await self._announce()  # a flush waiting on progress hears of the failed probe
        pending = await self._pending_quietly()
        log.warning("memory store or embedder unavailable: write-back paused with %s "
                    "exchanges pending; probing until it returns", pending)
        pause = 0.25
        while not self._stopping:
            # Cleared after the wait, not before: a flush asking during a probe is heard.
            with suppress(TimeoutError):
                await asyncio.wait_for(self._probe_now.wait(), pause)
            self._probe_now.clear()
            if self._stopping:
                break
            try:
                if self.probe is not None:
                    await self.probe()
            except Exception as exc:
                self._failed_probes += 1
                await self._announce()
                log.debug("memory store or embedder still unavailable: %s", type(exc).__name__)
                pause = min(OUTAGE_PROBE_MAX_S, pause * 2)
                continue
            log.info("memory store and embedder available again: write-back resumes")
            break
        self.outage = False

    async def _pending_quietly(self) -> int | None:
        try:
            return await self.run_blocking(self.outbox.pending_count)
        except Exception:
            return None

    async def _measure_quietly(self) -> None:
        # Exchanges written back before the outage count for a flush waiting now.
        with suppress(Exception):
            await self._measure()

    async def _failed(self, seq: int, exchange: Exchange, exc: Exception) -> None:
        # The error text is kept in the outbox for operators; logs carry only its type,
        # since handler errors can quote message contents.
        error = f"{type(exc).__name__}: {exc}"[:2000]

        def record() -> tuple[bool, int]:
            attempts = self.outbox.attempts(seq) + 1
            dead = self.outbox.retry_later(seq, self.backoff(attempts), error,
                                           max_attempts=self.max_attempts)
            return dead, attempts

        dead, attempts = await self.run_blocking(record)
        if dead:
            self._suspects.discard(seq)
        else:
            self._suspects.add(seq)
        if dead:
            log.error("write-back of request %s (seq %s) dead after %s attempts: %s",
                      exchange.request_id, seq, attempts, type(exc).__name__)
        else:
            log.warning("write-back of request %s (seq %s) failed, attempt %s: %s",
                        exchange.request_id, seq, attempts, type(exc).__name__)

    async def _measure(self) -> None:
        low = await self.run_blocking(self.outbox.low_water)
        if low != self._low_water:
            self._low_water = low
            await self._announce()

    async def _announce(self) -> None:
        if self._progress is not None:
            async with self._progress:
                self._progress.notify_all()


class _DestinationDown(Exception):
    """The handler failed because its destination is down: pause, count nothing."""
