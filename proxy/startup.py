"""What stops ``memcube-proxy serve`` from starting, said in one line that names the
setting and what to do, never as a traceback.

Checked up front, before any model loads: the data directory is this process's alone
(a lock file under it, held for the process's life), the port is free, and the files the
config names exist. What fails later, during the app's start-up (an adapter that does
not fit, a memory store in use or built for another embedder), is raised as a
:class:`StartupError` where it happens; :class:`OneLineStartup` then logs its line
instead of uvicorn's traceback.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from proxy.settings import Settings

log = logging.getLogger(__name__)

#: Under ``data_dir``: locked by the serving process, holding its pid.
LOCK_FILE = "memcube-proxy.lock"


class StartupError(Exception):
    """A start-up failure the operator can fix; each line of the message names the
    setting and says what to do."""


# -- the data directory --------------------------------------------------------------------

def shown(data_dir: Path) -> str:
    """The directory as configured, and where that is when it is relative."""
    return str(data_dir) if data_dir.is_absolute() else f"{data_dir} ({data_dir.resolve()})"


def data_dir_in_use(data_dir: Path) -> str:
    """The line for a data directory another process holds: the memcube-proxy whose pid
    is in the lock file, or (the lock file being this process's own, or none) whichever
    process holds the memory store's lock."""
    try:
        pid = (data_dir / LOCK_FILE).read_text().strip()
    except OSError:
        pid = ""
    if pid.isdigit() and int(pid) != os.getpid():
        who = f"another memcube-proxy process (pid {pid})"
    else:
        who = f"another process (it holds the memory store {data_dir / 'qdrant'})"
    return (f"data_dir {shown(data_dir)} is in use by {who}; one process per data dir: stop it, "
            "or give this one its own data_dir (the setting data_dir, or MEMCUBE_DATA_DIR)")


@dataclass
class DataDirLock:
    """An exclusive ``flock`` on ``data_dir/memcube-proxy.lock``, released when the
    process ends, however it ends (a killed process holds none)."""

    path: Path
    fd: int = field(repr=False)

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing the descriptor drops the lock
            self.fd = -1


def lock_data_dir(data_dir: Path) -> DataDirLock:
    path = data_dir / LOCK_FILE
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise StartupError(f"data_dir {shown(data_dir)}: cannot use it ({exc.strerror}); make it "
                           "writable, or set data_dir / MEMCUBE_DATA_DIR to a directory "
                           "this user can write") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise StartupError(data_dir_in_use(data_dir)) from None
        raise StartupError(f"data_dir {shown(data_dir)}: cannot lock {path} ({exc.strerror}); "
                           "use a local directory (set data_dir / MEMCUBE_DATA_DIR)") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return DataDirLock(path, fd)


def store_error(exc: Exception, data_dir: Path) -> StartupError:
    """A memory store that could not be opened at start-up, as a StartupError. Qdrant
    Edge refuses a second process on its directory with a WAL lock (``WouldBlock``):
    another process holds ``data_dir`` (one that took no lock file: in-process, or an
    older version)."""
    if "WouldBlock" in str(exc):
        return StartupError(data_dir_in_use(data_dir))
    return StartupError(f"memory store: {exc}")


# -- the address ---------------------------------------------------------------------------

def check_port(host: str, port: int) -> None:
    """Bind the address as uvicorn will (every address ``host`` resolves to), then let go:
    a port in use is found before the models load, not after."""
    fix = "pass --host/--port (or set host, port / MEMCUBE_HOST, MEMCUBE_PORT)"
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise StartupError(f"host {host!r} does not resolve ({exc.strerror}); {fix}") from None
    bound = 0
    for family, kind, proto, _, address in dict.fromkeys(infos):
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise StartupError(f"port {port} is in use on {host}; pass --port (or set "
                                       "port / MEMCUBE_PORT) or stop the other process") from None
                if exc.errno == errno.EADDRNOTAVAIL and len(infos) > 1:
                    continue  # that family is off here; asyncio skips it too
                raise StartupError(f"cannot listen on {host}:{port} ({exc.strerror}); "
                                   f"{fix}") from None
            bound += 1
    if not bound:
        raise StartupError(f"cannot listen on {host}:{port} (no address of it is on this "
                           f"machine); {fix}")


# -- files the config names ----------------------------------------------------------------

def check_files(settings: Settings, base: Path | None = None) -> None:
    """Model and adapter files the config names must exist (relative paths are read from
    the working directory ``base``); every one missing is a line."""
    base = base or Path.cwd()
    lines = []

    def where(name: str) -> str:
        return name if Path(name).is_absolute() else f"{name} (in {base})"

    for i, m in enumerate(settings.models):
        if m.backend == "llamacpp" and m.path and not (base / m.path).is_file():
            lines.append(f"models[{i}].path: {where(m.path)} does not exist; put the GGUF "
                         "model there, or remove `path` to use the embedded model")
    for i, a in enumerate(settings.adapters):
        if a.path and not (base / a.path).is_file():
            lines.append(f"adapters[{i}].path: {where(a.path)} does not exist; put the LoRA "
                         f"GGUF there (`memcube-proxy adapters make-test {a.path}` writes a "
                         "test one) or remove the adapter")
    if lines:
        raise StartupError("\n".join(lines))


# -- failures during the app's start-up ----------------------------------------------------

class OneLineStartup:
    """ASGI wrapper for uvicorn: when the app's start-up fails with a StartupError, its
    lines are logged, not the traceback uvicorn would log; ``error`` keeps it, for the
    exit status. Any other failure is reported as before, traceback and all (a bug)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.error: StartupError | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return
        held: list[Message] = []

        async def hold(message: Message) -> None:
            # Starlette sends the failure (with its traceback) before it raises.
            if message["type"] == "lifespan.startup.failed":
                held.append(message)
            else:
                await send(message)

        failure: BaseException | None = None
        try:
            await self.app(scope, receive, hold)
        except BaseException as exc:
            failure = exc
            raise
        finally:
            for message in held:
                if isinstance(failure, StartupError):
                    self.error = failure
                    for line in str(failure).splitlines():
                        log.error("cannot start: %s", line)
                    message = {**message, "message": ""}
                await send(message)
