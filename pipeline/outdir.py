"""The output folder's housekeeping: one run at a time, and no leftovers from killed runs.

A run holds an exclusive lock on `OUT/.dedupe.lock` (`fcntl.flock`, released by the kernel when
the process dies, even by kill -9) for its whole life. The lock file names the holder (pid, host,
start time, command line) so a second run into the same OUT can say who is in the way. Holding the
lock also proves that no other run is using OUT, so every `OUT/_work-*` folder still there was left
by a run that was killed: it is removed.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import socket
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from pipeline.config import ConfigError

log = logging.getLogger("pipeline")
LOCK_NAME = ".dedupe.lock"
WORK_PREFIX = "_work-"


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode("utf-8") or "{}")
    except (OSError, ValueError):
        return "another dedupe run"
    return (f"pid {info.get('pid')} on {info.get('host')}, started {info.get('started')}"
            f" ({info.get('command', '')})")


@contextlib.contextmanager
def locked(out: Path, name: str = LOCK_NAME, what: str = "output folder",
           option: str = "--out") -> Iterator[None]:
    """Hold OUT's run lock; ConfigError (exit 2) naming the holder when another run has it.
    (`name`, `what`, `option`: the same lock for another folder, e.g. the catalog.)"""
    path = out / name
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise ConfigError(f"cannot write in the {what} {str(out)!r} ({exc.strerror}): "
                          f"choose a writable {option}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"the output folder {str(out)!r} is in use by {_holder(fd)}: wait for that run "
                              "to finish, or choose another --out") from None
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "command": " ".join(sys.argv)[:500]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode("utf-8"), 0)
        yield
    finally:
        os.close(fd)  # releases the lock; the file stays (removing it would race a waiting run)


def remove_stale_work(out: Path, keep: Path | None = None) -> list[str]:
    """Remove `OUT/_work-*` folders and `OUT/.*.tmp` files of killed runs (only while holding the lock)."""
    removed = []
    for entry in sorted(out.glob(f"{WORK_PREFIX}*")):
        if keep is not None and entry == keep:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry.name)
    for entry in sorted(out.glob(".*.tmp")):  # write.py's temporary names, from a run killed mid-write
        entry.unlink(missing_ok=True)
        removed.append(entry.name)
    if removed:
        log.info("removed %d temporary file(s)/folder(s) left by killed runs: %s", len(removed), ", ".join(removed))
    return removed
