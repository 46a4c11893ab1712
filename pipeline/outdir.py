"""The output folder's housekeeping: one run at a time, outputs published as one unit, and no
leftovers from killed runs.

Publishing: a run writes all its files into `OUT/.dedupe/tmp-<run id>/`, fsyncs them, renames
the folder to `OUT/.dedupe/gen-<run id>/` and then swaps the symlink `OUT/.dedupe/current` to it
with one atomic rename. `OUT/pairs.parquet`, `OUT/images.parquet`, `OUT/run.json` and
`OUT/report.html` are symlinks through `current`, so every reader path resolves into exactly one
generation: a crash or a full disk at any point leaves the previous set whole, and a reader that
resolves `current` once (or checks `run.json`'s `files` sha256 list) never mixes two runs. The
previous generation is kept (for a rollback by hand); older ones are removed.

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
import re
import shutil
import socket
import stat
import threading
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

from pipeline import storage
from pipeline.config import ConfigError

log = logging.getLogger("pipeline")
LOCK_NAME = ".dedupe.lock"
WORK_PREFIX = "_work-"
STATE_DIR = ".dedupe"  # generations and the `current` link
PUBLISHED = storage.PUBLISHED  # linked into OUT
WORK_MARK = storage.WORK_MARK
# the temporary names a run gives its files in OUT itself (`_replace_symlink`, the report's page)
_OUT_TMP = re.compile(r"\.(?:%s)\.[0-9a-f]{8,32}\.tmp" % "|".join(re.escape(n) for n in PUBLISHED))


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode("utf-8") or "{}")
    except (OSError, ValueError):
        return "another dedupe run"
    return (f"pid {info.get('pid')} on {info.get('host')}, started {info.get('started')}"
            f" ({info.get('command', '')})")


def run_id_of(folder: str | Path) -> str | None:
    """The run_id in `folder`/run.json (OUT, or one of its generations); None where there is
    none or it cannot be read."""
    try:
        return json.loads((Path(folder) / "run.json").read_text(encoding="utf-8")).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None


class OutReplaced(RuntimeError):
    """OUT was removed or replaced while a run held its lock: nothing is published."""


_HELD: dict[str, int] = {}  # the lock files this process holds (by path): `check_still_locked`


def check_still_locked(out: Path, name: str = LOCK_NAME) -> None:
    """OutReplaced when the lock file this process holds for OUT is no longer OUT's: OUT was
    removed (or moved) during the run, and another run may have made it again and taken a lock of
    its own; publishing into it would mix two runs' outputs."""
    path = os.path.abspath(out / name)
    fd = _HELD.get(path)
    if fd is None:
        return
    held = os.fstat(fd)
    try:
        now = os.stat(path)
    except OSError:
        now = None
    if now is None or (now.st_dev, now.st_ino) != (held.st_dev, held.st_ino):
        raise OutReplaced(f"the output folder {str(out)!r} was removed or replaced during the run (its lock file "
                          "is not the one this run holds): nothing was published; run again")


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
            raise ConfigError(f"the {what} {str(out)!r} is in use by {_holder(fd)}: wait for that run "
                              f"to finish, or choose another {option}") from None
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "command": storage.command_line()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode("utf-8"), 0)
        _HELD[os.path.abspath(path)] = fd
        yield
    finally:
        _HELD.pop(os.path.abspath(path), None)
        os.close(fd)  # releases the lock; the file stays (removing it would race a waiting run)


RUN_FOLDER_PREFIX = "run-"  # a run's own folder in a work_dir set in the config: run-<pid>-<id>-<host>


def run_folder_name() -> str:
    """This run's own folder in a configured work_dir (`remove_dead_run_folders` knows it by its
    pid and host)."""
    return f"{RUN_FOLDER_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}-{socket.gethostname()}"


RUN_ENDED = "ended"  # written into a run's own folder when the run ends (any way but a kill)


def mark_run_ended(folder: str | Path) -> None:
    """Mark a run's own folder in work_dir as no longer in use: the next run, on any host,
    removes it (`remove_dead_run_folders`)."""
    storage.write_whole(storage.join(folder, RUN_ENDED), datetime.now(timezone.utc).isoformat().encode())


def _run_folder_owner(name: str) -> tuple[int, str] | None:
    """(pid, host) of a run folder's name, run-<pid>-<id>-<host>; None for another name."""
    parts = name[len(RUN_FOLDER_PREFIX):].split("-", 2) if name.startswith(RUN_FOLDER_PREFIX) else []
    if len(parts) != 3 or not parts[0].isdigit() or not parts[2]:
        return None
    return int(parts[0]), parts[2]


def runs_here(pid: int) -> bool:
    """Does a process with this pid run on this machine (another user's too)?"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # (another user's process)
    return True


def remove_dead_run_folders(work_dir: str | Path, keep: str | Path | None = None) -> list[str]:
    """Remove the run folders in `work_dir` (local or on a store) of runs that have ended: each
    run's is kept after it, to be looked at, until the next run. Without this a nightly job with
    work_dir set kept a copy of every night's features. A run marks its folder when it ends
    (`mark_run_ended`); a killed run cannot, so a folder of this host's without the mark goes
    when its pid no longer runs. One of another host's without the mark (a run there still
    going, or killed) is kept and named in the log: whether it runs cannot be told from here
    (a container's host name is new at each run, so such folders would pile up unseen)."""
    removed, unknown = [], []
    host = socket.gethostname()
    keep_name = str(keep).rstrip("/").rsplit("/", 1)[-1] if keep is not None else None
    if storage.is_url(work_dir):
        fs, root = storage.filesystem(str(work_dir))
        try:
            listed = fs.ls(root, detail=True, refresh=True)
        except FileNotFoundError:
            return removed
        folders = [(e["name"].rstrip("/"), e.get("type") == "directory") for e in listed]

        def ended(path):
            return fs.exists(f"{path}/{RUN_ENDED}")
    else:
        try:
            entries = sorted(Path(work_dir).iterdir())
        except FileNotFoundError:
            return removed
        folders = [(str(e), e.is_dir() and not e.is_symlink()) for e in entries]

        def ended(path):
            return os.path.lexists(os.path.join(path, RUN_ENDED))
    for path, is_folder in sorted(folders):
        name = path.rsplit("/", 1)[-1]
        owner = _run_folder_owner(name)
        if not is_folder or owner is None or name == keep_name:
            continue
        if ended(path) or (owner[1] == host and not runs_here(owner[0])):
            storage.remove_folder(storage.join(str(work_dir), name) if storage.is_url(work_dir) else path)
            removed.append(name)
        elif owner[1] != host:
            unknown.append(name)
    if removed:
        log.info("removed %d folder(s) of ended runs from work_dir: %s", len(removed), ", ".join(removed))
    if unknown:
        log.info("work_dir holds %d folder(s) of runs on other hosts that have not ended, or were killed "
                 "(remove those no longer running): %s", len(unknown), ", ".join(unknown))
    return removed


def remove_stale_work(out: Path, keep: Path | None = None) -> list[str]:
    """Remove what killed runs left in OUT (only while holding the lock): their marked
    `OUT/_work-<pid>` folders and their temporary files, `OUT/.<published name>.<hex>.tmp` and
    those of `OUT/.dedupe`. Nothing else in OUT is touched, whatever its name."""
    removed, left = [], []
    for entry in sorted(out.glob(f"{WORK_PREFIX}*")):
        if keep is not None and entry == keep or not entry.is_dir() or entry.is_symlink():
            continue
        if storage.is_run_work_folder(entry.name, os.listdir(entry)):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry.name)
        else:
            left.append(entry.name)
    for entry in sorted(out.glob(".*.tmp")):  # temporary names of a run killed mid-write
        if _OUT_TMP.fullmatch(entry.name) and not entry.is_dir():
            entry.unlink(missing_ok=True)
            removed.append(entry.name)
    state = out / STATE_DIR
    for entry in sorted(state.glob("tmp-*")) + sorted(state.glob(".*.tmp")):  # never published
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(f"{STATE_DIR}/{entry.name}")
    if removed:
        log.info("removed %d temporary file(s)/folder(s) left by killed runs: %s", len(removed), ", ".join(removed))
    if left:
        log.info("left alone in OUT: %s (no run's work folder: a run marks its own with %s)",
                 ", ".join(left), WORK_MARK)
    return removed


def check_no_foreign_outputs(out: Path) -> None:
    """ConfigError (exit 2, nothing changed) when OUT holds, under a name the run publishes, a file,
    folder or link no run of this tool made: publishing replaces those names (a user's
    `report/` folder was removed with its files)."""
    foreign = []
    try:
        for name in PUBLISHED:
            path = out / name
            if path.is_symlink():
                if os.readlink(path) != f"{STATE_DIR}/current/{name}":
                    foreign.append(name)
            elif os.path.lexists(path):
                foreign.append(name)
    except OSError:  # (an OUT that cannot be entered: taking its lock says so, exit 2)
        return
    if not foreign:
        return
    try:  # (a real run.json of this tool's: an OUT of the layout before generations)
        ours = not (out / "run.json").is_symlink() and storage.written_by_a_run((out / "run.json").read_bytes())
    except OSError:
        ours = False
    if not ours:
        raise ConfigError(f"--out {str(out)!r} already holds {', '.join(foreign)}, which no run of this tool made, "
                          "and a run would replace them with its outputs: choose an empty folder or a previous "
                          "run's OUT (nothing was changed)")


FSYNC_THREADS = 32  # concurrent fsyncs share the filesystem's journal commits


def _fsync_path(path: str | Path) -> None:
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode) or (stat.S_ISREG(st.st_mode) and st.st_nlink > 1):
        return
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if stat.S_ISDIR(st.st_mode) else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _walk_files(folder: str, folders: list[str]) -> Iterator[str]:
    """Every non-folder entry under `folder`, as the walk finds it (not listed first); each folder
    seen is appended to `folders`, `folder` itself first."""
    stack = [folder]
    while stack:
        current = stack.pop()
        folders.append(current)
        with os.scandir(current) as it:
            for entry in it:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                else:
                    yield entry.path


def _fsync_tree(folder: Path) -> None:
    """fsync every file and folder the new generation wrote, before the commit.

    From FSYNC_THREADS threads: one by one, ~9k report thumbnails took ~11 s at 10k images (~1.2 ms
    each, one journal commit per call); concurrent calls are committed together (3,000 files:
    7.5 s one by one, 0.25 s from 32 threads). Not syncfs(2), which also waits for every other
    process's writes on the filesystem. A file with more than one link is skipped: an earlier
    generation's thumbnail or drawing linked in (report reuse), durable since that generation's
    publish (its new link is a directory entry, covered by the folder's fsync).

    The threads take the files from one walk as it goes: a list of every path and a pool future
    per file (`pool.map`) were ~86 MB of the driver's peak at 100k files (~98k files, most of them report thumbnails;
    docs/benchmarks.md, driver_memory_notes)."""
    from concurrent.futures import ThreadPoolExecutor
    folders: list[str] = []
    files = _walk_files(str(folder), folders)
    lock = threading.Lock()

    def drain() -> None:
        while True:
            with lock:  # (a generator is not safe to advance from two threads at once)
                path = next(files, None)
            if path is None:
                return
            _fsync_path(path)

    with ThreadPoolExecutor(FSYNC_THREADS) as pool:
        for done in [pool.submit(drain) for _ in range(FSYNC_THREADS)]:
            done.result()  # (an fsync's error, raised here)
    # folders last, deepest first: each then records entries whose files are already durable
    for path in sorted(folders, key=lambda p: p.count(os.sep), reverse=True):
        _fsync_path(path)


def _replace_symlink(link: Path, target: str) -> None:
    """Point `link` at `target` atomically (a new link under a temporary name, renamed over)."""
    if link.is_symlink() and os.readlink(link) == target:
        return
    if link.is_dir() and not link.is_symlink():  # a folder left by an older layout: links replace it
        shutil.rmtree(link)
    tmp = link.with_name(f".{link.name}.{uuid.uuid4().hex[:8]}.tmp")
    os.symlink(target, tmp)
    try:
        os.replace(tmp, link)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def publish(out: Path, run_id: str, write: Callable[[Path], None],
            commit_point: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> Path:
    """`write(folder)` fills a new generation folder; then it becomes OUT's outputs in one atomic
    symlink swap, made inside `commit_point()` (the run's: progress.commit_point). Returns the
    generation folder. On any error before the swap the previous outputs stay."""
    check_still_locked(out)
    state = out / STATE_DIR
    state.mkdir(exist_ok=True)
    tmp = state / f"tmp-{run_id}"
    gen = state / f"gen-{run_id}"
    try:
        tmp.mkdir()
        write(tmp)
        _fsync_tree(tmp)
        os.rename(tmp, gen)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        check_still_locked(out)  # (again: writing the generation may have taken minutes)
    except OutReplaced:
        shutil.rmtree(gen, ignore_errors=True)  # (not left in the folder another run made)
        raise
    previous = os.readlink(state / "current") if (state / "current").is_symlink() else None
    with commit_point():
        _replace_symlink(state / "current", gen.name)  # the commit point
    _fsync_dir(state)
    for name in PUBLISHED:  # stable names in OUT, through `current` (made once, or after an old layout)
        if (gen / name).exists():
            _replace_symlink(out / name, f"{STATE_DIR}/current/{name}")
    _fsync_dir(out)
    for old in state.glob("gen-*"):
        if old.name not in (gen.name, previous):
            shutil.rmtree(old, ignore_errors=True)
    return gen


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def current_generation(out: Path) -> Path | None:
    """The folder OUT's published outputs live in, or None for an output of an older layout."""
    link = Path(out) / STATE_DIR / "current"
    return link.resolve() if link.is_symlink() else None
