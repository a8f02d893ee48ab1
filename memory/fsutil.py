"""Small file-system helpers shared by the durable parts (outbox, embedded store)."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (a new or renamed file in it) durable. Platforms that
    cannot open a directory (Windows) skip it: there a rename is durable once done."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
