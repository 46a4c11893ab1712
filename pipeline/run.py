"""The cascade end to end: scan -> screen -> candidates -> verify -> confirm -> decide -> write.

This module only wires the stages together and owns the Dask client; each stage lives in its own
module as a plain function over one partition. Data flows one way: every stage gets what it needs
as arguments and returns a frame.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import ctypes
import functools
import hashlib
import logging
import os
import platform
import tempfile
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import pandas as pd
import pyarrow as pa

import pipeline
from pipeline import candidates, catalog, decide, outdir, paths, scan, screen, storage, store, write
from pipeline.config import Config, ConfigError, check_scheduler
from pipeline.progress import Progress, Sent, again_if_lost, in_process_threads, map_tasks

log = logging.getLogger("pipeline")
TIER_ORDER = {"screen": 0, "verify": 1, "confirm": 2}
SCREEN_EMBED_SUBDIR = "screen_embeddings"  # high-recall mode's embeddings, under work_dir/embed


class _LazyClient:
    """A Client made on first use: a run that finds everything in its catalog (a threshold-only
    change, nothing new) never starts the local cluster."""

    def __init__(self, start: Callable[[], object]):
        self._start = start
        self._client = None

    def __getattr__(self, name: str):
        if self._client is None:
            self._client = self._start()
        return getattr(self._client, name)


class AutoClient:
    """dask.scheduler "auto": in-process while the work is small, a LocalCluster when it is not.

    The screen tells it how many files it has to read (`add_work`) as the walk goes on: past
    `dask.auto_max_files` the cluster starts in a background thread and the walk continues
    meanwhile (`ready()` says when tasks can go to it); a walk that ends below (`walk_done`) runs
    everything in this process, with no cluster start, no worker imports and one model build, on a
    pool of one thread per core (`progress.in_process_threads`, opened by the caller).
    After the screen, `resolved()` is what the later stages use: None (in-process) or the client.
    """

    def __init__(self, cfg: Config, stack: contextlib.ExitStack):
        self._cfg, self._stack = cfg, stack
        self.limit = cfg.dask.auto_max_files
        self.work = 0
        self.choice: str | None = None  # "sync" | "local", once decided
        self._thread = None
        self._client = None
        self._error: BaseException | None = None

    def add_work(self, n: int) -> None:
        self.work += n
        if self.choice is None and self.work > self.limit:
            self.choice = "local"
            import threading

            def start():
                try:
                    self._client = self._stack.enter_context(dask_client(self._cfg, "local"))
                except BaseException as exc:  # raised in the driver at the first use
                    self._error = exc
            self._thread = threading.Thread(target=start, name="dask-cluster-start", daemon=True)
            self._thread.start()
            log.info("auto scheduler: more than %d files to screen, starting the local cluster", self.limit)

    on_in_process: Callable[[], None] | None = None  # called once when the choice is in-process

    def walk_done(self) -> None:
        if self.choice is None:
            self.choice = "sync"
            log.info("auto scheduler: %d files to screen (<= %d), running in-process", self.work, self.limit)
            if self.on_in_process is not None:
                self.on_in_process()

    def ready(self) -> bool:
        return self.choice == "local" and not self._thread.is_alive()

    def resolved(self):
        if self.choice != "local":
            return None
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._client

    def __getattr__(self, name: str):  # used as a Client: wait for the cluster
        client = self.resolved()
        if client is None:
            raise RuntimeError("auto scheduler chose in-process: there is no client")
        return getattr(client, name)


def _local_cores(cfg: Config) -> int:
    """Workers a local cluster would start: dask.n_workers, else the CPUs this process may use."""
    if cfg.dask.n_workers:
        return cfg.dask.n_workers
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def running(client):
    """The client when its cluster is up, else None: work that this process can do as well (the
    report's pixels) does not start a cluster that a run served from its catalog never needed."""
    if isinstance(client, _LazyClient):
        return client._client
    return client


def target_of(cfg: Config, scheduler: str | None) -> str:
    """The scheduler asked for: --scheduler, else DASK_SCHEDULER_ADDRESS, else dask.scheduler."""
    return scheduler or os.environ.get("DASK_SCHEDULER_ADDRESS") or cfg.dask.scheduler


def check_reachable(target: str, timeout: float = 10.0) -> None:
    """A scheduler address (tcp:// or host:port) that refuses a TCP connection, or that takes one
    but does not answer as a Dask scheduler (its dashboard's port, another server): ConfigError
    now, before OUT is made and locked (the client's own attempt took 15 s after both, or, on a
    port that never answers, waited forever with OUT locked). Other schemes (tls://, which takes
    its certificates from Dask's own config) are left to the client."""
    if target in ("auto", "local", "sync") or ("://" in target and not target.startswith("tcp://")):
        return
    import asyncio
    import socket
    from distributed.comm import connect
    host, _, port = target.split("://", 1)[-1].rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot reach the Dask scheduler at {target!r} ({exc}): check --scheduler, "
                          "DASK_SCHEDULER_ADDRESS or dask.scheduler, or use --scheduler local") from None

    async def identity():
        comm = await connect(target if "://" in target else f"tcp://{target}", timeout=timeout)
        try:
            await comm.write({"op": "identity", "reply": True})
            return await comm.read()
        finally:
            comm.abort()
    try:  # (the outer limit: a server that takes the connection and says nothing is never timed out inside)
        answer = asyncio.run(asyncio.wait_for(identity(), timeout + 1))
    except Exception:  # (TimeoutError; or a server that speaks first, e.g. SSH, whose banner Dask reads
        answer = None  # as a message length: MemoryError "Unable to allocate 2.82 EiB")
    if not isinstance(answer, dict) or answer.get("type") != "Scheduler":
        raise ConfigError(f"{target!r} takes a connection but does not answer as a Dask scheduler: check the "
                          "port (a scheduler listens on 8786 by default; 8787 is its dashboard)")


def check_dashboard_served(address: str) -> None:
    """dask.dashboard_address for a local cluster: a host this machine cannot serve on (a name
    that does not resolve, another machine's address) is a ConfigError now; the cluster's start
    failed with a ~60-line traceback, after the screen had begun. (A port in use is not an error:
    Dask serves on another one and says so.)"""
    import socket
    text = str(address).strip()
    host = text.rpartition(":")[0].strip("[]")
    if text.lower() in ("", "none", "null") or not host or "," in text:  # (a list: Dask's to check)
        return
    try:
        found = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)
    except OSError as exc:
        problem = exc
    else:
        problem = None
        for family, kind, _, _, where in found:  # (served when any of them can be: as Tornado does)
            try:
                with socket.socket(family, kind) as probe:
                    probe.bind(where)
                return
            except OSError as exc:
                problem = exc
    raise ConfigError(f"dask.dashboard_address: {address!r} cannot be served on this machine ({problem}): give "
                      "one of its own addresses (e.g. :8787 or 127.0.0.1:8787), or none for no dashboard")


def worker_environ():
    """Config for the local cluster's worker processes: glibc's own allocator thresholds instead
    of Dask's default MALLOC_TRIM_THRESHOLD_=65536 (hand freed memory back to the OS at once),
    which also pins the mmap threshold, so every image-sized buffer is mapped and faulted in
    afresh: measured 20-30 % more CPU per feature task in a worker than in-process (docs/
    benchmarks.md, profile section). A value set in the environment still wins."""
    import dask
    return dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None})


@contextlib.contextmanager
def dask_client(cfg: Config, scheduler: str | None, lazy: bool = False) -> Iterator[object | None]:
    """None for "sync" (in-process); an AutoClient for "auto"; a LocalCluster for "local" (with
    `lazy`, started when first used); else connect to the address."""
    target = target_of(cfg, scheduler)
    if target == "sync":
        yield None
        return
    if target == "auto":
        with contextlib.ExitStack() as stack:
            auto = AutoClient(cfg, stack)
            try:
                yield auto
            finally:  # a run that fails during the walk: let a starting cluster come up, then close it
                if auto._thread is not None:
                    auto._thread.join()
        return
    from distributed import Client, LocalCluster
    if not log.isEnabledFor(logging.DEBUG):  # nannies starting, comms closing: noise for a batch job
        for name in ("distributed", "distributed.nanny", "distributed.scheduler", "distributed.worker"):
            logging.getLogger(name).setLevel(logging.WARNING)
    if target == "local" and lazy:
        with contextlib.ExitStack() as stack:
            yield _LazyClient(lambda: stack.enter_context(dask_client(cfg, "local")))
        return
    if target == "local":
        n_workers = _local_cores(cfg)
        # no dashboard: Dask's bokeh pages off, and its scheduler's own HTTP server (always there)
        # on a free port (None made Dask take :8787 anyway; "none" was taken for a host name)
        dashboard = str(cfg.dask.dashboard_address).strip().lower() not in ("", "none", "null")
        check_dashboard_served(cfg.dask.dashboard_address)  # (the auto scheduler's start: exit 2, not a traceback)
        with worker_environ():
            with _sigint_blocked():  # (while the workers are spawned)
                cluster = LocalCluster(
                    n_workers=n_workers, threads_per_worker=cfg.dask.threads_per_worker,
                    processes=True, dashboard_address=cfg.dask.dashboard_address if dashboard else ":0",
                    scheduler_kwargs=None if dashboard else {"dashboard": False},
                    preload=[__name__],  # (dask_setup below, in each worker process)
                    memory_limit=0 if str(cfg.dask.memory_limit).lower() in ("0", "none", "")
                    else cfg.dask.memory_limit,
                    silence_logs=logging.WARNING)
            with cluster:
                # not the default client (a context variable): the auto scheduler starts the cluster in
                # another thread than the one that closes it
                client = Client(cluster, set_as_default=False)
                try:
                    if dashboard:
                        log.info("Dask dashboard: %s (%d workers x %d threads)", client.dashboard_link, n_workers,
                                 cfg.dask.threads_per_worker)
                    _share_storage_options(client, cfg)
                    yield client
                finally:
                    client.close()
        return
    try:  # (its callers have checked the address first: `check_reachable`)
        client = Client(target, timeout="15s")
    except Exception as exc:  # (ValueError: a malformed address; TypeError: tls:// without certificates, ...)
        raise ConfigError(f"cannot reach the Dask scheduler at {target!r} ({type(exc).__name__}: {exc}): check "
                          "--scheduler, DASK_SCHEDULER_ADDRESS or dask.scheduler (a tls:// scheduler needs "
                          "Dask's distributed.comm.tls settings), or use --scheduler local") from None
    try:
        if not client.scheduler_info().get("workers"):
            wait_s = pipeline.progress.WORKER_WAIT_S
            log.info("the Dask scheduler at %s has no workers yet: waiting up to %.0f s", target, wait_s)
            try:
                client.wait_for_workers(1, timeout=wait_s)
            except TimeoutError:  # (the first task's scatter failed with a 50-line traceback, exit 1)
                raise ConfigError(f"the Dask scheduler at {target!r} has no workers (waited {wait_s:.0f} s): "
                                  f"start some (`dask worker {target}`), or use --scheduler local") from None
        log.info("connected to the Dask scheduler at %s (dashboard: %s)", target, client.dashboard_link)
        _share_storage_options(client, cfg)
        yield client
    finally:
        client.close()


@contextlib.contextmanager
def _sigint_blocked() -> Iterator[None]:
    """SIGINT blocked in this thread while a local cluster starts: the threads it starts inherit
    the mask, and so do the worker processes they spawn (now and when a worker is restarted), which
    then never see a terminal's Ctrl-C. `dask_setup` ignores it too, but only once a worker runs its
    preload: a Ctrl-C while the workers started printed two ~55-line tracebacks (CancelledError,
    then distributed's "Queue not closed"). The mask is put back on exit, and a Ctrl-C meanwhile
    still reaches the driver (Python runs its handlers in the main thread)."""
    import signal
    from multiprocessing import resource_tracker
    # (started first: its start blocks and then UNblocks SIGINT in the thread that starts it)
    resource_tracker.ensure_running()
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def dask_setup(worker) -> None:
    """Each local cluster worker process, as it starts (a Dask preload): Ctrl-C on a terminal
    reaches the whole process group, and each worker printed ~35 lines of KeyboardInterrupt
    tracebacks; the driver's handling of it (stop, close the cluster, exit 1) is all it needs."""
    import signal
    import threading
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.getLogger("distributed.worker").addFilter(SchedulerGoneFilter())


class SchedulerGoneFilter(logging.Filter):
    """A local cluster's scheduler lives in the driver, so a worker that cannot reach it is being
    closed with it (Ctrl-C, a failed run): distributed logs that heartbeat failure with its
    traceback (~20 lines) when the scheduler goes first, as it can under load. Other records pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Failed to communicate with scheduler during heartbeat")


def _share_storage_options(client, cfg: Config) -> None:
    """Every worker (present and future) opens object stores with this run's storage.options
    (registered under one name: a shared cluster's next run replaces them)."""
    client.register_plugin(storage.OptionsPlugin(cfg.storage.options), name=storage.OptionsPlugin.name)


def image_ids(names: Iterable[str | bytes]) -> np.ndarray:
    """Stable 63-bit ids from relative paths (their bytes): the same file keeps its id as the
    folder grows. For a valid UTF-8 name the bytes are its UTF-8 encoding."""
    ids = np.fromiter((int.from_bytes(hashlib.blake2b(p if isinstance(p, bytes) else p.encode("utf-8"),
                                                      digest_size=8).digest(), "big") >> 1
                       for p in names), dtype=np.int64)
    if len(np.unique(ids)) != len(ids):  # astronomically unlikely; refuse rather than merge images
        raise RuntimeError("image_id collision between two paths")
    return ids


def etag_differs(stored: str | None, entry: scan.FileEntry) -> bool:
    """Does the object's ETag differ from its catalog record's (`stored`)? Only when both have one:
    a local file has none, nor a record from a catalog written before ETags were kept (then size
    and mtime_ns decide, as before)."""
    return isinstance(stored, str) and entry.etag is not None and stored != entry.etag


# the screen's columns a reused row takes from its catalog record (the rest from the listing)
_RECORD_COLUMNS = ["width", "height", "format", "sha256", "hash", "error", "codes", "variant_mask"]


class _Reused:
    """Files whose catalog record stands in for a screen (no read, no decode): the listing's
    columns and the record's row, kept as columns (no dict per file) until `frame()`."""

    def __init__(self):
        self.listing: dict[str, list] = {c: [] for c in ("path", "abs_path", "bytes", "mtime", "mtime_ns", "etag")}
        self.at: list[int] = []

    def __len__(self) -> int:
        return len(self.at)

    def add(self, entry: scan.FileEntry, at: int) -> None:
        for column, value in (("path", paths.internal(entry.path)), ("abs_path", paths.internal(entry.abs_path)),
                              ("bytes", entry.bytes), ("mtime", entry.mtime), ("mtime_ns", entry.mtime_ns),
                              ("etag", entry.etag)):
            self.listing[column].append(value)
        self.at.append(int(at))

    def frame(self, known) -> pd.DataFrame:
        """SCREEN_COLUMNS rows: the listing's columns beside the records' (`known`: KnownImages)."""
        at = np.asarray(self.at, np.int64)
        if (at < 0).any():  # (a row with no record must never borrow another's)
            raise ValueError("a reused file has no catalog record")
        records = known.rows(at, _RECORD_COLUMNS)
        for column in records.columns:
            # a column none of these records fills (e.g. error, when the catalog's errors were
            # all of files now gone) stays object with None, as in screened rows: read as the
            # catalog's text type it would later refuse the errors a run adds
            if records[column].isna().all():
                records[column] = pd.Series(np.full(len(records), None, dtype=object), dtype=object)
        listing = pd.DataFrame(self.listing)  # (dtypes inferred, as for screened rows)
        return pd.concat([listing, records], axis=1)[SCREEN_COLUMNS].astype(_SCREEN_DTYPES)


_UNCHANGED = "\0unchanged"  # a --rehash row whose bytes match the catalog (replaced by its record)
# the screen's row plus the object's ETag from the listing (None for a local file). Added here, not
# in screen.py, whose source is part of the screen results' fingerprint (catalog._CODE): editing it
# would make every catalog's records stale
SCREEN_COLUMNS = [*screen.COLUMNS, "etag"]
_SCREEN_DTYPES = {"bytes": "int64", "mtime": "float64", "width": "Int64", "height": "Int64",
                  "variant_mask": "int64", "mtime_ns": "int64"}


def _screen_partition(entries: list[scan.FileEntry], cfg) -> pd.DataFrame:
    """screen.screen_partition, with each entry's ETag (SCREEN_COLUMNS)."""
    return screen.screen_partition(entries, cfg).assign(etag=pd.Series([e.etag for e in entries], dtype=object))


def _recheck_partition(entries: list[scan.FileEntry], known_sha: list[str], cfg) -> pd.DataFrame:
    """--rehash: read each file; screen it only when its sha256 differs from the catalog's.
    Returns the screened rows plus, for unchanged files, rows with `codes` None and error
    _UNCHANGED (the driver replaces them with the catalog record)."""
    rows = []
    for entry, sha in zip(entries, known_sha):
        try:
            with storage.open_input(entry.abs_path) as fh:
                digest = hashlib.sha256(fh.read()).hexdigest()
        except OSError:
            digest = None
        if digest == sha:
            rows.append(dict(screen.screen_file(scan.FileEntry(entry.path, entry.abs_path, entry.bytes,
                                                                entry.mtime, _UNCHANGED, entry.mtime_ns), cfg)))
        else:
            rows.append(screen.screen_file(entry, cfg))
        rows[-1]["etag"] = entry.etag
    return pd.DataFrame(rows, columns=SCREEN_COLUMNS).astype(_SCREEN_DTYPES)


def inside(root: Path | str, folders: Iterable[Path | str]) -> list[Path | str]:
    """The `folders` that lie inside `root` (a local folder, or a URL prefix on the same store)."""
    if storage.is_url(root):  # (by the place, not the text: az:// and abfs:// are one store)
        return [f for f in folders if storage.is_url(f) and storage.under(str(f), str(root))]
    base_path = Path(root).resolve()
    return [f for f in folders if not storage.is_url(f) and Path(f).resolve().is_relative_to(base_path)]


def run_screen(root: Path | str, cfg: Config, client, progress: Progress, known: catalog.KnownImages | None = None,
               rehash: bool = False, reuse: dict | None = None, skip: list[Path | str] | None = None,
               unlisted: list[tuple[str, str]] | None = None) -> pd.DataFrame:
    """Walk and screen. `known`: the catalog's records (catalog.KnownImages, matched by path); a
    file whose record was made with the same screen settings, with the same size and mtime_ns,
    and the same ETag when both have one (objects on a store: `etag_differs`), is not read (with
    `rehash`, it is read and its sha256 compared instead). `reuse` receives the counts and why
    files were screened.

    `client`: None (in-process), a Dask client, or an AutoClient, which this function settles
    (by the number of files it has to read); the later stages then use `auto.resolved()`.
    `skip`: the run's own folders (OUT, the catalog, the work folder), never scanned: inside DATA
    they would make each run find the last one's thumbnails (`inside`). `unlisted` receives the
    local folders that could not be listed (their files are left out)."""
    within = inside(root, skip or [])
    for folder in within:
        log.info("not scanned: %s (this run's output, inside DATA)", folder)
    # (a local folder by device and inode wherever it is: a symlink in DATA may lead to it)
    listing = storage.iter_objects(root, cfg.scan, within) if storage.is_url(root) \
        else scan.iter_files(root, cfg.scan, [f for f in skip or [] if not storage.is_url(f)], unlisted,
                             # (the catalog's images, unchanged, are not opened to be recognised)
                             known_images=None if known is None or rehash else known.images_as_they_were,
                             skip_holding=(outdir.LOCK_NAME, catalog.LOCK_NAME))
    batches = scan.batched(listing, cfg.dask.partition_size)
    frames: list[pd.DataFrame] = []
    reused = _Reused()
    why = {"new": 0, "changed_size_or_mtime": 0, "changed_etag": 0, "content_changed": 0, "scan_error": 0,
           "screen_settings_changed": 0, "failed_last_time": 0, "mtime_beyond_64_bits": 0}
    walked = 0

    def split(batch):
        """-> (screen these, recheck these and their known sha256)"""
        if known is None:
            return batch, [], []
        todo, check, shas = [], [], []
        for entry, at in zip(batch, known.find([paths.text_form(e.path) for e in batch])):
            if entry.error:
                why["scan_error"] += 1
                todo.append(entry)
            elif at < 0:
                why["new"] += 1
                todo.append(entry)
            elif known.stale[at]:
                why["screen_settings_changed"] += 1
                todo.append(entry)
            elif known.retry[at]:
                # a record of an error whose cause may be gone with the file unchanged (a read
                # that failed, permissions, scan.max_file_bytes, which is in no fingerprint) is
                # not reused: catalog.tried_again
                why["failed_last_time"] += 1
                todo.append(entry)
            elif rehash and isinstance(known.sha256[at], str):
                check.append(entry)
                shas.append(known.sha256[at])
            elif known.bytes[at] != entry.bytes or known.mtime_ns[at] != entry.mtime_ns or rehash:
                why["changed_size_or_mtime"] += 1
                todo.append(entry)
            elif not scan.mtime_ns_exact(entry.mtime_ns):  # (clamped: two such dates look equal)
                why["mtime_beyond_64_bits"] += 1
                todo.append(entry)
            elif etag_differs(known.etag[at], entry):  # rewritten within the mtime's resolution (1 s on S3)
                why["changed_etag"] += 1
                todo.append(entry)
            else:
                reused.add(entry, at)
        return todo, check, shas

    def tasks(batch):
        todo, check, shas = split(batch)
        out = []
        if todo:
            out.append((_screen_partition, (todo, cfg.screen)))
        if check:
            out.append((_recheck_partition, (check, shas, cfg.screen)))
        return out, len(batch) - len(todo) - len(check)

    auto = client if isinstance(client, AutoClient) else None
    with progress.stage("screen", unit="img") as tracker:
        from collections import deque
        held: deque = deque()  # "auto": tasks walked before the choice is made or the cluster is up
        sent = None  # progress.Sent: made with the first task (a lazy client starts then)
        results: dict[int, pd.DataFrame] = {}  # the partitions' frames by task number

        def run_here(n, fn, args):
            results[n] = fn(*args)
            tracker.update(len(args[0]))

        files_of: dict[int, int] = {}  # task number -> its number of files (the progress counts them)

        def submit(n, fn, args):
            nonlocal sent
            # the per-file lists go to the workers as data, not inside the task: the client's and
            # the scheduler's message logs (distributed.admin.low-level-log-length: 1000 messages
            # a stream) keep the tasks sent, and with them every screened file's entry (6 MB traced
            # at 10k files, ten times that at 100k); a task a lost worker took is sent again
            sent = sent or Sent(client)
            sent.send([(n, fn, args)], star=True)
            files_of[n] = len(args[0])

        def collect(block: bool) -> None:
            for n, frame in sent.results(block=block) if sent is not None else []:
                results[n] = frame
                tracker.update(files_of.pop(n))

        n_tasks = 0
        for batch in batches:  # walk and screen interleave: the total grows until the walk ends
            work, skipped = tasks(batch)
            tracker.update(skipped)
            walked += len(batch)
            tracker.set_total(walked, final=False)
            for fn, args in work:
                if auto is not None:
                    auto.add_work(len(args[0]))
                    held.append((n_tasks, fn, args))
                elif client is None:
                    run_here(n_tasks, fn, args)
                else:
                    submit(n_tasks, fn, args)
                n_tasks += 1
            if auto is not None and auto.ready():  # the cluster came up: hand it what was walked
                client = auto.resolved()
                while held:
                    submit(*held.popleft())
                auto = None
            collect(block=False)
        if auto is not None:
            auto.walk_done()
            client = auto.resolved()  # None: in-process; else wait for the cluster
            if client is None:  # the in-process threads (progress.in_process_threads), task order kept
                done = map_tasks(None, _call, [(fn, args) for _, fn, args in held], star=True, tracker=tracker,
                                 weight=lambda task: len(task[1][0]))
                results.update(zip([n for n, _, _ in held], done))
                held.clear()
            while held:
                submit(*held.popleft())
        collect(block=True)
        frames = [results[n] for n in sorted(results)]
        tracker.set_total(walked)
    images = (pd.concat(frames, ignore_index=True) if frames
              else pd.DataFrame({c: pd.Series(dtype="object") for c in SCREEN_COLUMNS}))
    frames.clear()  # the partitions' frames: held once, in `images`, from here on
    results.clear()
    if known is not None:
        unchanged = (images["error"] == _UNCHANGED).to_numpy()
        if unchanged.any():
            rows = images[unchanged]
            for entry_row, at in zip(rows.to_dict("records"), known.find([paths.text_form(p) for p in rows["path"]])):
                reused.add(scan.FileEntry(entry_row["path"], entry_row["abs_path"], int(entry_row["bytes"]),
                                          float(entry_row["mtime"]), None, int(entry_row["mtime_ns"]),
                                          entry_row["etag"] if isinstance(entry_row["etag"], str) else None), at)
        why["content_changed"] = int((~unchanged).sum()) - sum(v for k, v in why.items() if k != "content_changed")
        images = images[~unchanged]
        if len(reused):
            records = reused.frame(known)
            images = pd.concat([images, records], ignore_index=True) if len(images) else records
            del records
        if reuse is not None:
            reuse.update(files=walked, reused=len(reused), screened=walked - len(reused),
                         why_screened={k: v for k, v in why.items() if v})
        reused = None
    # names as the filesystem holds them -> the outputs' text form (pipeline/paths.py); the id
    # and the raw bytes come from the exact name, so nothing is lost
    raw = [paths.raw_bytes(p) for p in images["path"]]
    images["raw_path"] = [None if paths.is_utf8(b) else b for b in raw]
    images["image_id"] = image_ids(raw)
    images["path"] = [paths.text_form(p) for p in images["path"]]
    # (object, never float: a column of no errors read back as all-NaN would refuse the texts a
    # later step adds, e.g. a --rehash run's "changed during the run")
    images["error"] = pd.Series([paths.clean_text(e) if isinstance(e, str) else None for e in images["error"]],
                                index=images.index, dtype=object)
    images = images.sort_values("path", kind="stable").reset_index(drop=True)
    return images[["image_id", *[c for c in images.columns if c != "image_id"]]]


@contextlib.contextmanager
def _joined(threads: list) -> Iterator[None]:
    """Join the threads (None entries skipped) on the way out: a process must not exit while one
    is inside TensorFlow's import."""
    try:
        yield
    finally:
        for thread in threads:
            if thread is not None:
                thread.join()


def _build_model_ahead(cfg: Config):
    """In-process runs (the driver is the only worker): import TensorFlow and build the model in a
    background thread while the cheaper tiers run, so the confirm tier (or the screen embeddings)
    finds it ready instead of paying the seconds of start-up after them. The same process-wide
    model the tasks get (`confirm.get_embedder`, which waits for a build in progress); a failure
    here is left to the tier itself to raise. Only with `in_process_threads` (the "auto" path):
    `--scheduler sync` stays a plain single-threaded run."""
    from pipeline.progress import thread_pool
    if thread_pool() is None:
        return None
    import threading

    def build():
        try:
            from pipeline import confirm
            confirm.get_embedder(cfg.embed)
        except Exception:  # e.g. missing weights: the tier reports it where it is needed
            log.debug("building the model ahead failed", exc_info=True)

    thread = threading.Thread(target=build, name="model-ahead", daemon=True)
    thread.start()
    return thread


def _call(fn, args):
    return fn(*args)


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, or None where the C library has none (looked up once)."""
    try:
        return getattr(ctypes.CDLL("libc.so.6"), "malloc_trim", None)
    except OSError:
        return None


def release_freed_memory() -> bool:
    """Hand the C heap's freed pages back to the OS (glibc's malloc_trim), between the stages of
    the driver. glibc keeps what a stage freed (the tasks' unpickled results, the frames it built
    and dropped) in its arenas for reuse, and a later stage seldom reuses those holes: at 100k
    files the verify stage left 111 MB of them, and trimming alone took the run's peak 1,028 -> 952
    MB (docs/benchmarks.md, the 2026-12-03 10:57 entry). Returns False where there is no
    malloc_trim (not glibc)."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


def representatives(images: pd.DataFrame) -> pd.Series:
    """Valid images that are the first of their byte-identical group: only these take part in
    the near search and the later tiers."""
    valid = images["error"].isna() & images["codes"].notna()
    return valid & candidates.exact_representatives(images["sha256"])


def by_row(images: pd.DataFrame) -> pd.DataFrame:
    """`images` indexed by row number, as the tiers look images up: the screen's frame itself when
    it already is (a copy of every row was ~24 MB of a 100k-file run, held to its end)."""
    rows = pd.RangeIndex(len(images))
    return images if images.index.equals(rows) else images.set_index(rows)


def screen_embeddings(images: pd.DataFrame, cfg: Config, work_dir: Path | str, client,
                      progress: Progress | None = None) -> pd.DataFrame:
    """High-recall mode: the confirm tier's embedding (transform 0, key idx * 8) of every
    representative image, in the feature store under work_dir/embed/screen_embeddings.
    Returns key, part_path, error; run_confirm reuses them (`precomputed`)."""
    from pipeline import confirm
    idx = np.flatnonzero(representatives(images).to_numpy()).astype(np.int64)
    return confirm.embed_keys(idx * 8, by_row(images), cfg, storage.join(work_dir, "embed", SCREEN_EMBED_SUBDIR),
                              client=client, progress=progress, stage_name="screen-embed")


# the internal pair frame's kind and source: categories (a byte a pair; as text, ~9 B a pair
# each, held by the driver from the candidates to the end of the run)
PAIR_KINDS = pd.CategoricalDtype(["exact", "near"])
PAIR_SOURCES = pd.CategoricalDtype(["hash", "embedding", "both"])


def _category(n: int, dtype: pd.CategoricalDtype, value: str | None) -> pd.Categorical:
    """n times `value` (None: missing) as a column of `dtype`."""
    code = -1 if value is None else dtype.categories.get_loc(value)
    return pd.Categorical.from_codes(np.full(n, code, np.int8), dtype=dtype)


def build_pairs(images: pd.DataFrame, cfg: Config, client, emb_parts: list[str] | None = None,
                timings: dict | None = None, previous: tuple[pd.DataFrame, np.ndarray] | None = None,
                info: dict | None = None, keep_lists: bool = True, lists_dir: str | None = None) -> pd.DataFrame:
    """Exact pairs + near candidates (hash; plus embedding neighbours when `emb_parts`, the
    screen embeddings' partition files, are given).

    `previous`: the catalog's K-nearest lists (in current row numbers) and which images are
    unchanged since; then only the lists a change can affect are searched again (same result).
    `info` (a dict) receives the search counts ("search") and, with `keep_lists`, the directed
    lists ("neighbours"); without it, lists searched on the workers never reach this process
    (the pairs are made there: `candidates.Lists`). `lists_dir`: lists searched on the workers and
    kept are written there by the workers (`candidates.SavedLists`), not gathered here."""
    exact = candidates.exact_pairs(images["sha256"], cfg.screen.exact_group_pairs)
    exact = exact.assign(hash_distance=np.int16(0), transform=np.int8(0),
                         kind=_category(len(exact), PAIR_KINDS, "exact"),
                         source=_category(len(exact), PAIR_SOURCES, None))
    valid = images["error"].isna() & images["codes"].notna()
    representative = representatives(images)
    codes, mask = screen.unpack_codes(images, cfg.screen)
    mask &= valid.to_numpy()[:, None]
    if previous is None:
        directed = candidates.directed_neighbours(codes, mask, cfg.screen, client=client,
                                                  representatives=representative.to_numpy(), gather=False)
        search = {"images": int((representative & valid).sum()), "searched": "all (no usable catalog lists)"}
    else:
        directed, search = candidates.incremental_neighbours(codes, mask, cfg.screen, previous[0], previous[1],
                                                             client=running(client),
                                                             representatives=representative.to_numpy(), gather=False)
    near = candidates.pairs_from_neighbours(directed, codes, mask, cfg.screen, representative.to_numpy(),
                                            client=running(client))
    # (more than K images with one hash: their lists hold only each other; their first image is
    # paired with its nearest outside the group too, candidates.tie_bridges)
    bridges, search["tied_hash_groups"] = candidates.tie_bridges(codes, mask, cfg.screen, representative.to_numpy(),
                                                                 client=running(client))
    n_near = len(near)
    near = candidates.with_pairs(near, bridges)
    search["tie_bridge_pairs"] = len(near) - n_near
    del bridges
    if isinstance(directed, candidates.Lists):  # (the workers let go of them with the futures)
        if not (keep_lists and info is not None):
            directed = None
        else:
            directed = directed.write(lists_dir) if lists_dir is not None else directed.gather()
    if emb_parts is not None:
        t = time.perf_counter()
        emb = candidates.embedding_pairs(emb_parts, cfg.screen, client=client)
        if timings is not None:
            timings["embedding_knn"] = time.perf_counter() - t
        near = candidates.union_pairs(near, emb, codes, mask, cfg.screen,
                                      representatives=representative.to_numpy(), client=running(client))
        near = near.assign(source=pd.Categorical(near["source"], dtype=PAIR_SOURCES))
    else:
        near = near.assign(source=_category(len(near), PAIR_SOURCES, "hash"))
    near = near.assign(kind=_category(len(near), PAIR_KINDS, "near"))
    pairs = pd.concat([exact, near], ignore_index=True)
    pairs = pairs.astype({"idx_a": "int64", "idx_b": "int64", "hash_distance": "int16", "transform": "int8"})
    if info is not None:
        info.update(search=search, **({"neighbours": directed} if keep_lists else {}))
    return pairs


def run(root: str | Path, out: str | Path, cfg: Config, scheduler: str | None = None,
        quiet: bool = False, rehash: bool = False) -> dict:
    """Run the whole cascade; returns the manifest written to OUT/run.json.

    Holds OUT's lock for the whole run (a second run into the same OUT stops with ConfigError),
    and removes its work folder however the run ends (an exception, Ctrl-C, SIGTERM turned into an
    exception by the CLI); folders of runs killed outright are removed by the next run.

    With a catalog (`catalog:`, default OUT/catalog; pipeline/catalog.py) the run also holds the
    catalog's lock, reuses what the catalog knows and commits what it learnt; `rehash` reads every
    file to compare its sha256 instead of trusting an unchanged size and mtime.
    """
    for what, given in (("DATA", root), ("--out", out)):  # ("" would be the current folder)
        if isinstance(given, str) and not given.strip():
            raise ConfigError(f"{what} is empty: pass a folder (e.g. make dedupe DATA=photos OUT=out)")
    root, out = storage.local_form(root), storage.local_form(out)
    cfg = dataclasses.replace(cfg, work_dir=storage.local_form(cfg.work_dir))  # (file:///x: the folder /x)
    catalog_dir = catalog.resolve(cfg, out)  # None, a folder, or a store URL (default: OUT/catalog)
    on_store = [str(p) for p in (root, out, cfg.work_dir, catalog_dir) if storage.is_url(p)]
    storage.configure(cfg.storage.options)
    for url in on_store:
        if not storage.filesystem(url)[1].strip("/"):  # (a bad scheme, a missing backend or refused options: exit 2 now)
            raise ConfigError(f"{url!r} names no bucket or container: give a bucket (and a prefix), e.g. "
                              f"{url.split('://', 1)[0]}://bucket/prefix")
    if storage.is_url(root):
        storage.check_input(root)
    else:
        # (absolute: a cluster's workers check and read it from their own folders, as OUT below)
        root = Path(os.path.abspath(root))
        if not root.is_dir():
            raise ConfigError(f"input folder {str(root)!r} does not exist or is not a folder: "
                              "pass DATA=<folder of images>")
        try:  # (a folder that cannot be listed, or entered, would read as an empty collection)
            with paths.scandir(str(root.absolute())):
                pass
            if not scan.enterable(str(root.absolute())):  # (read permission without execute: names only)
                raise PermissionError(errno.EACCES, "Permission denied", str(root))
        except OSError as exc:
            raise ConfigError(f"input folder {str(root)!r} cannot be listed ({exc.strerror}): give this user "
                              "read and execute permission on it") from None
    if storage.is_url(root) == storage.is_url(out) and (
            storage.location(root) == storage.location(out) if storage.is_url(out)
            else Path(root).resolve() == Path(out).resolve()):
        raise ConfigError(f"--out {str(out)!r} is DATA itself: the outputs would be scanned as images; choose "
                          f"another folder, e.g. {storage.join(root, 'dedupe-out')} (inside DATA is fine: a run "
                          "never scans its own OUT)")
    if catalog_dir is not None and storage.is_url(catalog_dir) == storage.is_url(root) and (
            storage.location(str(catalog_dir)) == storage.location(str(root)) if storage.is_url(root)
            else Path(catalog_dir).resolve() == Path(root).resolve()):
        raise ConfigError(f"the catalog {str(catalog_dir)!r} is DATA itself: its files would be written among the "
                          "images; choose another folder (the default is OUT/catalog)")
    if cfg.work_dir and storage.is_url(cfg.work_dir) == storage.is_url(root) and (
            storage.location(str(cfg.work_dir)) == storage.location(str(root)) if storage.is_url(root)
            else Path(cfg.work_dir).resolve() == Path(root).resolve()):
        raise ConfigError(f"work_dir {str(cfg.work_dir)!r} is DATA itself: the run's working files would be written "
                          "among the images; choose another folder, or leave work_dir empty (OUT/_work-<pid>)")
    if not storage.is_url(out):
        out = Path(os.path.abspath(out))  # (absolute: a cluster's workers write under it from their own folders)
        if out.exists() and not out.is_dir():
            raise ConfigError(f"output path {str(out)!r} exists and is not a folder: choose another --out")
    # (Arrow, which writes the Parquet files, takes UTF-8 paths only: such a run failed at its end,
    # with a traceback, after all the work; DATA's names may be anything)
    for what, where in (("--out", out), ("the catalog (catalog:)", catalog_dir), ("work_dir", cfg.work_dir)):
        if where not in (None, "") and not paths.is_utf8(os.path.abspath(str(where)) if not storage.is_url(where)
                                                   else str(where)):
            raise ConfigError(f"{what} {paths.text_form(str(where))!r} is not a valid UTF-8 path, and the Parquet "
                              "writer takes only those: choose a folder whose path is")
    check_scheduler(scheduler or os.environ.get("DASK_SCHEDULER_ADDRESS") or cfg.dask.scheduler,
                    "--scheduler" if scheduler else "DASK_SCHEDULER_ADDRESS"
                    if os.environ.get("DASK_SCHEDULER_ADDRESS") else "dask.scheduler")
    weights_info = None
    if TIER_ORDER[cfg.tiers] >= TIER_ORDER["confirm"] or cfg.screen.mode == "hash+embedding":
        from pipeline import weights  # fail before any heavy work when the weights are missing
        weights_info = weights.check_weights_available(cfg.embed)
    check_reachable(target_of(cfg, scheduler))
    if target_of(cfg, scheduler) == "local":  # ("auto": checked as its cluster starts, if it does)
        check_dashboard_served(cfg.dask.dashboard_address)
    if cfg.work_dir and not storage.is_url(cfg.work_dir):  # (found only when the tiers wrote there)
        try:
            Path(cfg.work_dir).mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=cfg.work_dir):
                pass
        except OSError as exc:
            raise ConfigError(f"work_dir {cfg.work_dir!r} cannot be written ({exc.strerror}): choose a writable "
                              "folder, or leave work_dir empty (OUT/_work-<pid>)") from None
    try:
        if not storage.is_url(out):
            out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create the output folder {str(out)!r} ({exc.strerror}): "
                          "choose another --out") from None
    remote_out = storage.is_url(out)
    # (before OUT's lock is taken: a refused OUT is left as it was)
    if not remote_out:
        outdir.check_no_foreign_outputs(out)
    else:
        storage.check_no_foreign_outputs(out)
    if catalog_dir is not None and not storage.is_url(catalog_dir):
        catalog.check_not_foreign(Path(catalog_dir))
    catalog_lock = storage.join(catalog_dir, catalog.LOCK_NAME) if storage.is_url(catalog_dir) else None
    with storage.locked(out, also=catalog_lock) if remote_out else outdir.locked(out):
        # a work_dir set in the config gets a folder of this run's own inside it, kept after the run
        # until the next run (what the tiers stored there can be looked at): two runs
        # sharing it wrote their embeddings under the same part names, each filed by its own image
        # rows, and one read the other's vectors as its own (exit 0, other pairs)
        own = outdir.run_folder_name()
        work_dir = (storage.join(cfg.work_dir, own) if storage.is_url(cfg.work_dir)
                    else Path(os.path.abspath(cfg.work_dir)) / own) if cfg.work_dir \
            else storage.join(out, f"{outdir.WORK_PREFIX}{os.getpid()}") if remote_out \
            else out / f"{outdir.WORK_PREFIX}{os.getpid()}"
        if cfg.work_dir:
            outdir.remove_dead_run_folders(cfg.work_dir if storage.is_url(work_dir) else Path(work_dir).parent,
                                           keep=work_dir)
        if cfg.work_dir and not storage.is_url(work_dir):  # (made now: a cluster's workers check it first)
            Path(work_dir).mkdir(parents=True, exist_ok=True)
        if remote_out:
            storage.remove_stale_work(out, keep=work_dir)
        else:
            outdir.remove_stale_work(out, keep=work_dir)
        if not cfg.work_dir:  # (made marked as a run's: the next run removes it if this one is killed)
            storage.mark_work_folder(work_dir)
        try:
            with (catalog.opened(catalog_dir) if catalog_dir is not None
                  else contextlib.nullcontext(None)) as cat:
                return _cascade(root, out, cfg, scheduler, Progress(quiet), work_dir, weights_info,
                                cat=cat, rehash=rehash)
        finally:
            if not cfg.work_dir:
                storage.remove_folder(work_dir)
            else:
                with contextlib.suppress(Exception):  # (not to hide the run's own error)
                    outdir.mark_run_ended(work_dir)


def _set(pairs: pd.DataFrame, rows, column: str, values) -> None:
    """pairs.loc[rows, column] = values, keeping the column's (nullable) dtype."""
    if len(rows):
        pairs.loc[rows, column] = pd.array(values, dtype=pairs[column].dtype)  # (an array: no index alignment)


def _by_content(images: pd.DataFrame, cids: np.ndarray) -> pd.DataFrame:
    """abs_path, error, size and the file as the screen saw it (bytes, mtime_ns) of one image per
    content, indexed by content id (what the verify and confirm tiers key their features by when
    a catalog is used)."""
    rep = representatives(images).to_numpy()
    frame = images.loc[rep, ["abs_path", "error", "width", "height", "bytes", "mtime_ns"]].copy()
    frame.index = pd.Index(cids[rep], dtype=np.int64)
    return frame


def _adopt(cat: catalog.Catalog, kind: str, fp: str, pre: pd.Series, sha_of_cid: pd.Series,
           new_features: list[pd.DataFrame]) -> tuple[pd.Series, int]:
    """Add the complete feature parts a killed run left (same settings) to `pre`; they are listed
    in the catalog at this run's commit. Returns the new `pre` and how many keys were adopted."""
    orphans = cat.orphan_parts(kind, fp, sha_of_cid)
    orphans = orphans[~orphans["key"].isin(pre.index)]
    if not len(orphans):
        return pre, 0
    new_features.append(catalog.new_feature_rows(cat, kind, fp, orphans, sha_of_cid))
    extra = pd.Series(orphans["part_path"].to_numpy(dtype=object), index=orphans["key"].to_numpy(np.int64))
    return pd.concat([pre, extra]), int(len(orphans))


def drop_failed_scores(cat: catalog.Catalog, fps: dict) -> np.ndarray:
    """Drop from `cat.evidence` the scores made from features that failed for a cause that may be
    gone (catalog.tried_again, catalog.without_failed_scores): those pairs are scored again, their
    features made again. The failures of every stored setting count, not only of `fps`: a run
    under other settings forgets the other settings' feature rows (`features_table`) but keeps
    the scores of pairs it did not score again, which a return to those settings would reuse
    with nothing left to say they came from a failure (a key's score under the other settings
    is dropped with them: it is made again if it is wanted). Returns the pairs whose stored ORB
    scores were dropped: (content id a, content id b, evidence key: `verify.evidence_transforms`),
    for run.json's why_verified.failed_last_time."""
    from pipeline import confirm, verify

    def orb_keys(a, b, key):  # (the features a stored pair was checked with)
        return verify.pair_feature_keys(a, b, verify.checked_transforms(*verify.evidence_parts(key)))

    def embedding_keys(a, b, key):
        return confirm.pair_embedding_keys(a, b, verify.evidence_parts(key)[0])
    failed = {"orb": cat.failed("orb", None), "embed": cat.failed("embed", None)}
    before = cat.evidence
    cat.evidence = catalog.without_failed_scores(before, failed, {"orb": orb_keys, "embed": embedding_keys})
    gone = before.loc[before.index.difference(cat.evidence.index)] if len(cat.evidence) < len(before) \
        else before.iloc[:0]
    return pd.MultiIndex.from_arrays([catalog.content_ids(gone["sha_a"].astype(object)),
                                      catalog.content_ids(gone["sha_b"].astype(object)),
                                      gone["transform"].to_numpy(np.int64)])


def _screen_embeddings_from_catalog(cat: catalog.Catalog, images: pd.DataFrame, cids: np.ndarray,
                                    sha_of_cid: pd.Series, by_content: pd.DataFrame, fps: dict, cfg: Config,
                                    work_dir: Path | str, run_id: str, client, progress: Progress,
                                    new_features: list[pd.DataFrame]) -> tuple[pd.DataFrame, pd.Series, dict]:
    """High-recall mode with a catalog: embed only the representatives whose content has no stored
    transform-0 embedding (the confirm tier's, same model and settings), then lay every
    representative's embedding out under work_dir as a run from scratch does (same kNN input).
    Returns (screen_emb as screen_embeddings returns it, catalog key -> part, reuse counts)."""
    from pipeline import confirm
    rows = np.flatnonzero(representatives(images).to_numpy())
    ckeys = cids[rows] * 8
    sha = images["sha256"].to_numpy(dtype=object)
    pre, fcounts = cat.feature_parts("embed", fps["embed"], sha[rows], np.zeros(len(rows), np.int64))
    pre, adopted = _adopt(cat, "embed", fps["embed"], pre, sha_of_cid, new_features)
    todo = ckeys[~np.isin(ckeys, pre.index.to_numpy())]
    made = confirm.embed_keys(todo, by_content, cfg, str(cat.feature_dir("embed", fps["embed"], f"{run_id}-screen")),
                              client=client, progress=progress, stage_name="screen-embed")
    new_features.append(catalog.new_feature_rows(cat, "embed", fps["embed"], made, sha_of_cid))
    part_of = pd.concat([pre, pd.Series(made["part_path"].to_numpy(dtype=object),
                                        index=made["key"].to_numpy(np.int64))])
    part_of = part_of[~part_of.index.duplicated(keep="last")]
    screen_emb = catalog.gather_embeddings(part_of, pd.Series(ckeys, index=rows),
                                           storage.join(work_dir, "embed", SCREEN_EMBED_SUBDIR),
                                           cfg.dask.partition_size)
    # (reused: from the catalog; adopted, a killed run's, counted apart as the tiers count them)
    info = {"images": int(len(rows)), "embeddings_reused": int(len(rows) - len(todo) - adopted),
            "embeddings_computed": int(len(todo)), "embeddings_adopted_from_killed_run": adopted,
            "embeddings_redone_settings_changed": fcounts["settings_changed"],
            "embeddings_redone_failed_last_time": fcounts["failed_last_time"]}
    return screen_emb, part_of, info


def _cascade(root: Path | str, out: Path | str, cfg: Config, scheduler: str | None, progress: Progress,
             work_dir: Path | str, weights_info: dict | None, cat: catalog.Catalog | None = None,
             rehash: bool = False) -> dict:
    # the client stays open to the end: its workers also make the report's thumbnails and drawings
    with dask_client(cfg, scheduler, lazy=cat is not None) as client:
        if target_of(cfg, scheduler) not in ("sync", "auto", "local"):  # (a cluster's workers have their own
            storage.check_workers(client, str(root))                   # environment and file systems)
            for what, where in (("output folder", out), ("work_dir", work_dir if cfg.work_dir else None),
                                ("catalog", cat.directory if cat is not None else None)):
                if where and not storage.is_url(where):  # (the tiers write there; a store is checked by its writes)
                    storage.check_workers(client, str(where), what, write=True)
        # where the workers write the K-nearest lists a catalog keeps (candidates.SavedLists):
        # removed when the stages end, whether they got to the commit or not (a work_dir set in
        # the config is not removed with the run)
        lists_dir = storage.join(work_dir, f"lists-{uuid.uuid4().hex[:12]}")
        try:
            return _stages(client, root, out, cfg, scheduler, progress, work_dir, weights_info, cat, rehash,
                           lists_dir)
        finally:
            storage.remove_folder(lists_dir)


def _stages(client, root: Path | str, out: Path | str, cfg: Config, scheduler: str | None, progress: Progress,
            work_dir: Path | str, weights_info: dict | None, cat: catalog.Catalog | None, rehash: bool,
            lists_dir: str) -> dict:
    """The stages in order, on `client` (see dask_client); `lists_dir`: where the workers write
    the K-nearest lists a catalog keeps (`build_pairs`)."""
    high_recall = cfg.screen.mode == "hash+embedding"
    started = datetime.now(timezone.utc)
    run_id = f"{started:%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"
    timings: dict[str, float] = {}
    counts: dict[str, int] = {}
    fps = catalog.fingerprints(cfg, weights_info)
    reuse: dict = {"catalog": str(cat.directory) if cat is not None else None}
    new_features: list[pd.DataFrame] = []
    ran_features: dict[str, str] = {}
    verified = False
    confirmed = None
    thumbs = None  # where the verify tier's feature rows are, for the report (stored_features)

    # a URL as given; a local folder resolved (its name in the text form of pipeline/paths.py)
    root_text, out_text = (p if storage.is_url(p) else paths.text_form(str(p.resolve())) for p in (root, out))
    ahead: list = []  # model-building threads (_build_model_ahead), joined before the run returns
    with (in_process_threads(_local_cores(cfg)) if isinstance(client, AutoClient) else contextlib.nullcontext()), \
            _joined(ahead):
        t = time.perf_counter()
        reuse["screen"] = {}
        known = catalog.known_records(cat, fps, root_text, reuse["screen"])
        if high_recall and isinstance(client, AutoClient):  # every image is embedded: load the model during the screen
            client.on_in_process = lambda: ahead.append(_build_model_ahead(cfg))
        unlisted: list[tuple[str, str]] = []
        images = run_screen(root, cfg, client, progress, known=known, rehash=rehash, reuse=reuse["screen"],
                            skip=[out, work_dir, *([cat.directory] if cat is not None else [])], unlisted=unlisted)
        if unlisted:
            log.warning("%d folder(s) (or files) could not be listed; they are left out of this run: %s", len(unlisted),
                        "; ".join(f"{folder} ({why})" for folder, why in unlisted[:10]))
        counts["unlisted_folders"] = len(unlisted)
        if len(images) == 0 and known is not None and len(known) > 0:  # (an unmounted share looks like this)
            raise ConfigError(f"DATA {root_text} holds no files now, but the catalog knows {len(known)} from it: "
                              "is it mounted? If the collection really is empty, run with --no-catalog")
        del known  # arrays over the catalog's images: not needed past the screen
        release_freed_memory()  # (the screen's partitions, concatenated into `images`)
        if isinstance(client, AutoClient):  # settled by the screen: None (in-process) or the cluster
            used = client.choice
            client = client.resolved()
        else:
            used = "sync" if client is None else "local" if target_of(cfg, scheduler) == "local" else "remote"
        timings["scan+screen"] = time.perf_counter() - t
        counts["files"] = len(images)
        counts["errors"] = int(images["error"].notna().sum())
        log.info("screened %d files (%d with errors)", counts["files"], counts["errors"])
        sha = images["sha256"].to_numpy(dtype=object)  # one Python string per image, shared below
        if cat is not None:
            has_sha = images["sha256"].notna().to_numpy()
            cids = np.full(len(images), -1, np.int64)
            cids[has_sha] = catalog.check_content_ids(images.loc[has_sha, "sha256"])
            # (object: the images' own strings; a `str` Series copies each into Arrow, and every
            # value taken out of it again, e.g. by stored_features, is a new Python string)
            sha_of_cid = pd.Series(sha[has_sha], index=cids[has_sha], dtype=object)
            sha_of_cid = sha_of_cid[~sha_of_cid.index.duplicated()]
            by_content = _by_content(images, cids)

        screen_emb = None
        screen_emb_by_cid = None  # with a catalog: the screen embeddings' catalog keys -> parts
        if high_recall:
            t = time.perf_counter()
            if cat is None:
                screen_emb = screen_embeddings(images, cfg, work_dir, client, progress)
            else:
                screen_emb, screen_emb_by_cid, reuse["screen_embed"] = _screen_embeddings_from_catalog(
                    cat, images, cids, sha_of_cid, by_content, fps, cfg, work_dir, run_id, client, progress,
                    new_features)
            timings["screen_embed"] = time.perf_counter() - t
            counts["screen_embedded"] = len(screen_emb)
            counts["screen_embed_errors"] = int(screen_emb["error"].notna().sum())
        t = time.perf_counter()
        search_info: dict = {}
        reuse["candidates"] = {}
        with progress.stage("candidates", unit="img") as tracker:
            previous = catalog.previous_lists(cat, images, representatives(images).to_numpy(), fps,
                                              reuse["candidates"])
            if cat is not None:  # the old images and lists: used by the screen and just above only
                cat.drop_tables("images", "neighbours")
            pairs = again_if_lost("the candidate search", lambda previous=previous: build_pairs(
                images, cfg, client, timings=timings, previous=previous, info=search_info,
                emb_parts=None if screen_emb is None else screen_emb["part_path"].tolist(),
                # (the directed lists are kept for the catalog's commit only: when searched on
                # the workers, in files there, read back a partition at a time by the commit)
                keep_lists=cat is not None, lists_dir=lists_dir))
            tracker.update(len(images))
            del previous
        release_freed_memory()
        reuse["candidates"].update(search_info.get("search", {}))
        timings["candidates"] = time.perf_counter() - t
        counts["exact_pairs"] = int((pairs["kind"] == "exact").sum())
        counts["near_candidates"] = int((pairs["kind"] == "near").sum())
        if high_recall:
            counts["embedding_only_candidates"] = int((pairs["source"] == "embedding").sum())
            counts["hash_and_embedding_candidates"] = int((pairs["source"] == "both").sum())
        log.info("%d exact pairs, %d near candidates", counts["exact_pairs"], counts["near_candidates"])
        # in-process: TensorFlow loads while the verify tier runs; not in a re-run that read no
        # file (a threshold changed, nothing new: the catalog has every pair's scores, and a pair it
        # has not, e.g. after screen.max_distance grew, builds the model when the tier needs it)
        if client is None and not high_recall and counts["near_candidates"] and \
                TIER_ORDER[cfg.tiers] >= TIER_ORDER["confirm"] and \
                (cat is None or reuse["screen"].get("screened", len(images)) > 0):
            ahead.append(_build_model_ahead(cfg))

        frame = by_row(images)
        for col, dtype in (("orb_matches", "Int32"), ("orb_inliers", "Int32"), ("orb_score", "Float32"),
                           ("orb_status", "object"), ("orb_reason", "object"), ("cosine", "Float32"),
                           ("ssim", "Float32"), ("hist_corr", "Float32")):
            pairs[col] = pd.Series(pd.NA, index=pairs.index, dtype=dtype)
        near = pairs.index[pairs["kind"] == "near"]
        # (embedding-only pairs are checked mirrored and plain: verify.checked_transforms; their
        # stored evidence is keyed so: verify.evidence_transforms), per pair position
        checked_both = (pairs["source"] == "embedding").to_numpy(bool)
        both_ways = checked_both[pairs.index.get_indexer(near)]
        rescored = drop_failed_scores(cat, fps) if cat is not None else None
        if TIER_ORDER[cfg.tiers] >= TIER_ORDER["verify"] and len(near):
            from pipeline import verify
            t = time.perf_counter()
            if cat is None:
                scores = verify.run_verify(pairs.loc[near, ["idx_a", "idx_b", "transform"]].assign(both_ways=both_ways),
                                           frame, cfg, storage.join(work_dir, "orb"), client=client,
                                           progress=progress)
                made = verify.features_made(scores)
                _share_texts(scores)
                pairs.loc[near, scores.columns] = scores
                counts["verify_features"] = len(made)
                thumbs = stored_features(store.part_of_keys(made["key"], made["part_path"]), pd.Series(sha, dtype=object))
            else:  # pairs already scored with these settings are taken from the catalog
                sub = pairs.loc[near, ["idx_a", "idx_b", "transform"]]
                ia, ib = sub["idx_a"].to_numpy(), sub["idx_b"].to_numpy()
                tt = sub["transform"].to_numpy(np.int64)
                keys = verify.evidence_transforms(tt, both_ways)  # (how each pair is checked keys its evidence)
                hit, found = catalog.lookup_evidence(cat, sha[ia], sha[ib], keys, "orb", fps["orb"])
                for col in catalog.ORB_COLUMNS:
                    _set(pairs, near[hit], col, found[col])
                todo = near[~hit]
                info = {"pairs_reused": int(hit.sum()), "pairs_verified": int(len(todo))}
                if len(todo):
                    job = pd.DataFrame({"idx_a": cids[ia[~hit]], "idx_b": cids[ib[~hit]],
                                        "transform": tt[~hit], "both_ways": both_ways[~hit]}, index=todo)
                    pre, fcounts = cat.feature_parts("orb", fps["orb_features"],
                                                     *verify.needed_features(sha[ia[~hit]], sha[ib[~hit]],
                                                                             verify.checked_transforms(
                                                                                 tt[~hit], both_ways[~hit])))
                    pre, adopted = _adopt(cat, "orb", fps["orb_features"], pre, sha_of_cid, new_features)
                    scores = verify.run_verify(job, by_content, cfg,
                                               cat.feature_root("orb", fps["orb_features"]),
                                               client=client, progress=progress, precomputed=pre)
                    made = verify.features_made(scores)
                    counts["verify_features"] = len(made)
                    new_features.append(catalog.new_feature_rows(cat, "orb", fps["orb_features"], made, sha_of_cid))
                    made_here = pd.concat([store.part_of_keys(made["key"], made["part_path"]), pre])
                    _share_texts(scores)
                    for col in scores.columns:
                        _set(pairs, todo, col, scores[col])
                    info.update(features_reused=fcounts["reused"], features_computed=int(len(made)),
                                features_adopted_from_killed_run=adopted,
                                features_redone_settings_changed=fcounts["settings_changed"],
                                features_redone_failed_last_time=fcounts["failed_last_time"])
                    stale = catalog.lookup_evidence(cat, sha[ia[~hit]], sha[ib[~hit]], keys[~hit], "orb_any", "")[0]
                    retried = np.zeros(len(todo), bool)  # (scored from features that failed: drop_failed_scores)
                    if len(rescored):
                        retried = pd.MultiIndex.from_arrays([cids[ia[~hit]], cids[ib[~hit]], keys[~hit]]).isin(rescored)
                    retried &= ~stale
                    # (stored as checked the other way: found by hash at one run, by embedding
                    # alone at another; or stored before pairs were keyed by how they are checked)
                    other = catalog.lookup_evidence(cat, sha[ia[~hit]], sha[ib[~hit]],
                                                    verify.other_way(keys[~hit]), "orb_any", "")[0]
                    other &= ~stale & ~retried
                    info["why_verified"] = {"settings_changed": int(stale.sum()), "failed_last_time": int(retried.sum()),
                                            "checked_another_way": int(other.sum()),
                                            "new_pair": int(len(todo) - stale.sum() - retried.sum() - other.sum())}
                reuse["verify"] = info
                ran_features["orb"] = fps["orb_features"]
                # the report's thumbnails and drawings come from the feature rows of every near
                # pair's images, reused pairs too (a new OUT beside a shared catalog has no earlier
                # report: decoding each shown file was 142 of a 100k-file re-run's 161 s); the
                # catalog's parts are read and checked by the report's tasks that use them
                # (each image's rows once: by row number, not a text per pair and side)
                rows_needed, t_needed = verify.needed_features(ia, ib, verify.checked_transforms(tt, both_ways))
                wanted = np.unique(rows_needed.astype(np.int64) * 8 + t_needed)
                del rows_needed, t_needed
                listed, _ = cat.feature_parts("orb", fps["orb_features"], sha[wanted // 8], wanted % 8, check=False)
                del wanted
                thumbs = stored_features(pd.concat([made_here, listed]) if len(todo) else listed, sha_of_cid, cat)
                made_here = listed = None
            verified = True
            timings["verify"] = time.perf_counter() - t
            counts["verified_pairs"] = len(near)
            counts["verify_rejected"] = int((pairs["orb_status"] == "no-match").sum())
            counts["pixel_checked"] = int(pairs["ssim"].notna().sum())
            counts["verify_accepted"] = int(((pairs["kind"] == "near") & (pairs["orb_status"] != "no-match")
                                             & (pairs["orb_status"] != "partial")
                                             & (pairs["orb_inliers"].fillna(0) >= cfg.decide.accept_inliers)).sum())
            counts["verify_partial"] = int((pairs["orb_status"] == "partial").sum())
            scores = found = None
            release_freed_memory()  # (the tasks' results, unpickled and copied into `pairs`)
        if TIER_ORDER[cfg.tiers] >= TIER_ORDER["confirm"]:
            from pipeline import confirm
            # only what the verify tier neither rejected nor accepted outright (pipeline/decide.py)
            routed = decide.needs_confirm(pairs, cfg)
            alive = pairs.index[routed]
            confirmed = routed[pairs.index.get_indexer(near)] if len(near) else np.zeros(0, bool)
            t = time.perf_counter()
            if len(alive) and cat is None:
                reuse_emb = None if screen_emb is None else \
                    pd.Series(screen_emb["part_path"].to_numpy(dtype=object),
                              index=screen_emb["key"].to_numpy(dtype=np.int64))
                cos = confirm.run_confirm(pairs.loc[alive, ["idx_a", "idx_b", "transform"]], frame,
                                          cfg, storage.join(work_dir, "embed"), client=client,
                                          precomputed=reuse_emb, progress=progress)
                counts["confirm_embedded"] = int(cos.attrs.get("embedded_keys", 0))
                counts["confirm_reused"] = int(cos.attrs.get("reused_keys", 0))
                pairs.loc[alive, "cosine"] = cos.astype("float32")
            elif len(alive):
                sub = pairs.loc[alive, ["idx_a", "idx_b", "transform"]]
                ia, ib = sub["idx_a"].to_numpy(), sub["idx_b"].to_numpy()
                tt = sub["transform"].to_numpy(np.int64)
                from pipeline.verify import evidence_transforms, other_way
                keys = evidence_transforms(tt, checked_both[pairs.index.get_indexer(alive)])
                hit, found = catalog.lookup_evidence(cat, sha[ia], sha[ib], keys, "cosine", fps["embed"])
                _set(pairs, alive[hit], "cosine", found["cosine"])
                # (a cosine does not depend on how ORB checked the pair: one stored under the
                # other way's key serves as well)
                miss = np.flatnonzero(~hit)
                if len(miss):
                    again, found = catalog.lookup_evidence(cat, sha[ia[miss]], sha[ib[miss]], other_way(keys[miss]),
                                                           "cosine", fps["embed"])
                    _set(pairs, alive[miss[again]], "cosine", found["cosine"])
                    hit[miss[again]] = True
                todo = alive[~hit]
                info = {"pairs_reused": int(hit.sum()), "pairs_embedded": int(len(todo))}
                if len(todo):
                    job = pd.DataFrame({"idx_a": cids[ia[~hit]], "idx_b": cids[ib[~hit]],
                                        "transform": tt[~hit]}, index=todo)
                    pre, fcounts = cat.feature_parts("embed", fps["embed"],
                                                     np.concatenate([sha[ia[~hit]], sha[ib[~hit]]]),
                                                     np.concatenate([np.zeros_like(tt[~hit]), tt[~hit]]))
                    if screen_emb_by_cid is not None:  # this run's screen embeddings (not listed yet)
                        pre = pd.concat([pre, screen_emb_by_cid[~screen_emb_by_cid.index.isin(pre.index)]])
                        # (a failed one the screen made again is counted there, not twice)
                        wanted = np.concatenate([cids[ia[~hit]] * 8, cids[ib[~hit]] * 8 + tt[~hit]])
                        again = np.intersect1d(np.intersect1d(wanted, cat.failed("embed", fps["embed"])["key"]),
                                               screen_emb_by_cid.index.to_numpy(np.int64))
                        fcounts["failed_last_time"] -= len(again)
                    pre, adopted_emb = _adopt(cat, "embed", fps["embed"], pre, sha_of_cid, new_features)
                    edir = cat.feature_dir("embed", fps["embed"], run_id)
                    cos = confirm.run_confirm(job, by_content, cfg, str(edir), client=client,
                                              precomputed=pre, progress=progress)
                    made = catalog.parts_summary(edir)
                    new_features.append(catalog.new_feature_rows(cat, "embed", fps["embed"], made, sha_of_cid))
                    _set(pairs, todo, "cosine", cos.astype("float32"))
                    counts["confirm_embedded"] = int(cos.attrs.get("embedded_keys", 0))
                    counts["confirm_reused"] = int(cos.attrs.get("reused_keys", 0))
                    info.update(embeddings_reused=fcounts["reused"], embeddings_computed=int(len(made)),
                                embeddings_adopted_from_killed_run=adopted_emb,
                                embeddings_redone_settings_changed=fcounts["settings_changed"],
                                embeddings_redone_failed_last_time=fcounts["failed_last_time"])
                reuse["confirm"] = info
                ran_features["embed"] = fps["embed"]
            elif cat is not None:  # (no pair reached the tier: the key is there all the same)
                reuse["confirm"] = {"pairs_reused": 0, "pairs_embedded": 0}
            timings["confirm"] = time.perf_counter() - t
            counts["confirmed_pairs"] = len(alive)

        # the tiers' working frames (copies of pair rows, their results) go before decide and write
        sub = job = scores = found = pre = cos = None
        release_freed_memory()
    # a file rewritten while the tiers ran is marked, not silently mixed (its hash is from before)
    changed = np.asarray(storage.changed_since(images["abs_path"], images["bytes"], images["mtime"], images["etag"])
                         if storage.is_url(root) else
                         scan.changed_since(images["abs_path"], images["bytes"], images["mtime"]), dtype=bool)
    changed &= images["error"].isna().to_numpy()
    images.loc[changed, "error"] = decide.CHANGED_ERROR
    counts["changed_during_run"] = int(changed.sum())
    counts["errors"] = int(images["error"].notna().sum())
    if changed.any():
        log.warning("%d file(s) changed during the run; they are marked and left undecided", int(changed.sum()))

    t = time.perf_counter()
    # decided a part at a time, keeping the verdicts and the rule codes used: the reasons are made
    # again, a part at a time, as pairs.parquet is written (`contract_parts`)
    dup = np.zeros(len(pairs), dtype=bool)
    rules: set[str] = set()
    for start in range(0, len(pairs), decide.PART_ROWS):
        part = decide.decide_rows(pairs, cfg, changed, np.arange(start, min(start + decide.PART_ROWS, len(pairs))))
        dup[start:start + len(part)] = part["is_duplicate"].to_numpy(bool)
        rules.update(part["rule"].unique().tolist())
        del part
    images["cluster_id"] = decide.clusters(len(images), pairs["idx_a"].to_numpy()[dup], pairs["idx_b"].to_numpy()[dup],
                                           images["image_id"].to_numpy())
    timings["decide"] = time.perf_counter() - t
    counts["duplicate_pairs"] = int(dup.sum())
    counts["clusters"] = int(images.loc[images["cluster_id"] >= 0, "cluster_id"].nunique())
    counts["images_in_clusters"] = int((images["cluster_id"] >= 0).sum())

    scored = pairs.index.get_indexer(near)  # positions of the near pairs (the catalog's evidence)
    manifest = {
        "tool": "dedupe-pipeline", "version": pipeline.__version__, "run_id": run_id,
        "contract_version": write.CONTRACT_VERSION,
        "root": root_text, "out": out_text,
        "started": started.isoformat(), "finished": datetime.now(timezone.utc).isoformat(),
        "scheduler": target_of(cfg, scheduler), "scheduler_used": used,
        "config": {**cfg.to_dict(), "storage": {"options": storage.redacted(cfg.storage.options)}},
        "counts": counts, "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "weights": weights_info, "versions": versions(), "reuse": reuse,
    }
    if cat is not None:  # the catalog first: the outputs' run.json then says what it committed
        t = time.perf_counter()
        kept = has_sha
        if changed.any():
            # what the tiers made of a file rewritten during the run may be of its new bytes,
            # under the sha256 of its old ones: nothing of those contents is kept (made again
            # at the next run, which reads the file again)
            tainted = set(sha[changed])
            kept = has_sha & ~pd.Series(sha, dtype=object).isin(tainted).to_numpy(bool)
            stays = kept[pairs["idx_a"].to_numpy()[scored]] & kept[pairs["idx_b"].to_numpy()[scored]]
            scored = scored[stays]
            confirmed = confirmed[stays] if confirmed is not None else None
            new_features = [f[~f["sha256"].isin(tainted)] for f in new_features]
        from pipeline.verify import evidence_transforms
        present = pa.array(sha[kept], pa.string())  # (an Arrow array: catalog.among; no set of N strings)
        # sha256 as object columns sharing the images' strings: a str column would copy each
        # 64-character text into Arrow, ~72 B per pair and side, held through the commit
        rows = pd.DataFrame({"sha_a": pd.Series(sha[pairs["idx_a"].to_numpy()[scored]], dtype=object),
                             "sha_b": pd.Series(sha[pairs["idx_b"].to_numpy()[scored]], dtype=object),
                             # (keyed by how each pair was checked: verify.evidence_transforms)
                             "transform": evidence_transforms(pairs["transform"].to_numpy(np.int64)[scored],
                                                              checked_both[scored]),
                             "at": scored.astype(np.int64)})
        # (made as it is written, its scores read from `pairs` a part at a time: a copy of each
        # scored pair's ORB numbers, texts and cosine was ~30 B a pair, held through the commit)
        evidence = catalog.EvidenceTable(cat, present, rows, fps, verified, confirmed, values=pairs)
        del rows  # (the table holds what it needs of them)
        features = catalog.features_table(cat, present, new_features, ran_features)
        cat.drop_tables("evidence", "features")  # (the new tables hold what is kept of them)
        committed = cat.commit(root=root_text, run_id=run_id, fps=fps,
                               images=catalog.images_table(images, fps),
                               # (popped: the lists, 18 B a row, K rows an image, are not held through the write stage)
                               neighbours=catalog.neighbours_table(lists := search_info.pop("neighbours"), images),
                               evidence=evidence, features=features, config=cfg.to_dict(),
                               # (the workers' parts: listed by their writers' digests, not read again)
                               written=store.written_anywhere(running(client), cat.feature_root_folder()))
        if isinstance(lists, candidates.SavedLists):
            lists.remove()
        del lists
        reuse["problems"] = list(cat.problems)
        reuse["catalog_generation"] = committed["generation"]
        reuse["catalog_compacted"] = committed.get("compacted", [])
        manifest["timings_s"]["catalog"] = round(time.perf_counter() - t, 3)
        del evidence, features, committed
        # what the tiers and the commit looked up by content: not held through the write stage
        # (this run's feature rows, ~0.2 kB each, in Arrow; the set of contents)
        del present, sha_of_cid, cids, has_sha, by_content
        new_features.clear()
        release_freed_memory()
    # nor the tiers' per-pair positions and the sha256 texts as Python strings (~120 B an image)
    del sha, near, scored
    confirmed = screen_emb = screen_emb_by_cid = None
    # the hashes are in the catalog (or were for the search only): not held through the write
    # stage, the driver's peak (a bytes object per image, ~105 B; in place: `frame` is `images`)
    for column in ("codes", "variant_mask"):
        del images[column]
    # pairs.parquet part by part, in its row order, each part decided again (the reasons of one
    # part at a time); the report gets the pairs it shows (the duplicates of the clusters it lists
    # and the closest rejected ones)
    order = output_order(pairs, images)

    def contract_parts(tracker) -> Iterator[pd.DataFrame]:
        for start in range(0, max(len(order), 1), decide.PART_ROWS):  # (one empty part for no pairs)
            yield contract_pairs(decide.decide_rows(pairs, cfg, changed, order[start:start + decide.PART_ROWS]), images,
                                 columns=write.PAIRS_SCHEMA.names, in_order=True)  # (no abs paths: the file has none)
            tracker.update(min(decide.PART_ROWS, len(order) - start))
            release_freed_memory()  # (the part just written)

    from pipeline.report import DRAW_INDEX, PAIR_COLUMNS, THUMB_INDEX, duplicate_pairs_per_cluster, shown_pairs
    cid = images["cluster_id"].astype("Int64")
    clustered = pd.DataFrame({"path": images["path"], "image_id": images["image_id"], "cluster_id": cid.where(cid >= 0)})
    ids = images["image_id"].to_numpy()
    shown, _ = shown_pairs(clustered, pd.DataFrame({"is_duplicate": dup[order],
                                                    "image_id_a": ids[pairs["idx_a"].to_numpy()[order]],
                                                    "image_id_b": ids[pairs["idx_b"].to_numpy()[order]],
                                                    **{c: pairs[c].to_numpy()[order]
                                                       for c in ("cosine", "orb_inliers", "hash_distance")}}),
                           cfg.report)
    cluster_pairs = duplicate_pairs_per_cluster(clustered, dup, ids[pairs["idx_a"].to_numpy()])
    del clustered
    # (only the columns the report reads: the path texts of its ~1 pair per listed image were
    # ~28 MB at 100k files, held through the write stage)
    report_pairs = contract_pairs(decide.decide_rows(pairs, cfg, changed, order[shown]), images,
                                  columns=PAIR_COLUMNS, in_order=True)  # (shown ascends)
    with progress.stage("write", total=len(images) + len(pairs), unit="row") as tracker, \
            (storage.last_generation(out, (THUMB_INDEX, DRAW_INDEX)) if storage.is_url(out)
             else contextlib.nullcontext(out / "report")) as last:  # its report's thumbnails are reused
        # (locally OUT/report: a link to the current one, or a copy's folder; on a store the last
        # report's indexes, its files carried over on the server: storage.last_generation)

        def write_into(folder):
            write.write_outputs(folder, images, contract_parts(tracker), manifest, previous_report=last,
                                stored_features=thumbs, client=running(client), report_pairs=report_pairs,
                                rules=sorted(rules), rejected_total=int((~dup).sum()), cluster_pairs=cluster_pairs)
            pipeline.progress.raise_if_stopped()  # (a stop signal whose exception was lost: not published)
        # (a signal from the commit point on no longer fails the run: its outputs are the new ones)
        if storage.is_url(out):
            storage.publish(out, run_id, write_into, last=last, commit_point=pipeline.progress.commit_point)
        else:
            outdir.publish(out, run_id, write_into, commit_point=pipeline.progress.commit_point)
        tracker.update(len(images))
    return manifest


def _share_texts(scores: pd.DataFrame) -> None:
    """The verify tier's status and reason texts, in place, as one Python string per distinct
    value: each pair's comes from a worker as a string of its own (~170 B a pair, ~85 MB of the
    driver's memory through the write stage of a 100k-file run), and a run has a few thousand."""
    for column in ("orb_status", "orb_reason"):
        if column in scores:
            scores[column] = pd.Series(store.shared_text(scores[column]), index=scores.index, dtype=object)


def output_order(pairs: pd.DataFrame, images: pd.DataFrame) -> np.ndarray:
    """Positions of the internal pair rows in the outputs' order: path_a, then path_b."""
    ia, ib = pairs["idx_a"].to_numpy(np.int64), pairs["idx_b"].to_numpy(np.int64)
    path = images["path"]
    if path.is_monotonic_increasing and path.is_unique:  # rows in path order (run_screen): sort the row numbers
        return np.lexsort((ib, ia))
    return pd.DataFrame({"a": path.to_numpy(dtype=object)[ia], "b": path.to_numpy(dtype=object)[ib]}) \
        .sort_values(["a", "b"], kind="stable").index.to_numpy()


def stored_features(part_of: pd.Series, sha_of_id: pd.Series, cat: catalog.Catalog | None = None) -> pd.DataFrame:
    """Where the verify tier's feature rows are, for the report (its thumbnails: every row of a
    decoded file carries one, verify.features_partition; its drawings: the rows' keypoints).
    `part_of`: the rows' key (id * 8 + transform) -> part path; `sha_of_id`: id -> sha256 (ids:
    image rows, or content ids with a catalog). Indexed by sha256, so exact copies share one:
    part_path, key of the content's plain row (else its mirrored one), mirrored_part_path,
    mirrored_key of its mirrored row (transform 4) when it has one (null otherwise). With the
    catalog `cat`, also part_check and mirrored_part_check: what it lists for each part
    (`Catalog.part_checks`; null for a part this run made), checked by the report's tasks."""
    if len(part_of) and part_of.index.duplicated().any():  # (a key found in two places: its first)
        part_of = part_of[~part_of.index.duplicated()]
    keys = np.asarray(part_of.index, dtype=np.int64)
    # texts as object columns sharing the callers' strings (one per part, one per content): pandas
    # would make `str` columns, a copy of every row's path and sha256 (~320 B a row, 12 MB at 100k)
    frame = pd.DataFrame({"sha256": pd.Series(sha_of_id.reindex(keys // 8).to_numpy(dtype=object), dtype=object),
                          "part_path": pd.Series(part_of.to_numpy(dtype=object), dtype=object), "key": keys})
    frame = frame[frame["sha256"].notna() & frame["part_path"].notna()].sort_values("key", kind="stable")
    mirrored = frame[frame["key"] % 8 == 4].drop_duplicates("sha256").set_index("sha256")
    frame = frame.drop_duplicates("sha256").set_index("sha256")
    frame["mirrored_part_path"] = pd.Series(mirrored["part_path"].reindex(frame.index).to_numpy(dtype=object),
                                            index=frame.index, dtype=object)
    # (nullable Int64 before the reindex: content keys are 63-bit and float64 keeps 53)
    frame["mirrored_key"] = mirrored["key"].astype("Int64").reindex(frame.index)
    if cat is not None:
        parts = pd.unique(pd.concat([frame["part_path"], frame["mirrored_part_path"]]).dropna())
        check_of = pd.Series(cat.part_checks(parts), index=pd.Index(parts, dtype=object), dtype=object)
        for column in ("part", "mirrored_part"):
            frame[f"{column}_check"] = pd.Series(check_of.reindex(frame[f"{column}_path"]).to_numpy(dtype=object),
                                                 index=frame.index, dtype=object)
    return frame


def contract_pairs(pairs: pd.DataFrame, images: pd.DataFrame, columns: Iterable[str] | None = None,
                   in_order: bool = False) -> pd.DataFrame:
    """Internal pair rows -> the output contract's columns (plus abs paths for the report), or only
    `columns` of them (the report's, report.PAIR_COLUMNS, no path texts; a part of pairs.parquet's,
    write.PAIRS_SCHEMA's, no abs paths). `in_order`: the rows
    are in the outputs' order already (taken in `output_order`'s order), not sorted again: that
    checks every image's path for order and repeats, ~4 s and ~0.3 GB at 10M images, a part.

    Built column by column from the images' columns taken at the pair rows (Arrow strings stay
    Arrow: no Python string per pair, no copy of whole image rows), sorted by path_a, path_b."""
    ia, ib = pairs["idx_a"].to_numpy(np.int64), pairs["idx_b"].to_numpy(np.int64)

    def take(column: str, rows: np.ndarray):
        values = images[column]
        return values.array.take(rows) if values.dtype != object else values.to_numpy()[rows]

    def text(column: str):
        values = pairs[column]
        if values.dtype == object:  # Python strings may carry undecodable bytes of a name (paths.py)
            return [paths.clean_text(r) for r in values]
        return values.array  # Arrow strings are valid UTF-8 already

    def number(column: str):
        return lambda: pairs[column].to_numpy()

    made = {
        "path_a": lambda: take("path", ia), "path_b": lambda: take("path", ib),
        "image_id_a": lambda: images["image_id"].to_numpy()[ia], "image_id_b": lambda: images["image_id"].to_numpy()[ib],
        **{c: number(c) for c in ("hash_distance", "orb_matches", "orb_inliers", "orb_score", "cosine", "ssim",
                                  "hist_corr")},
        "stage": lambda: text("stage"), "is_duplicate": number("is_duplicate"),
        "reason": lambda: text("reason"), "rule": lambda: text("rule"),
        "abs_path_a": lambda: take("abs_path", ia), "abs_path_b": lambda: take("abs_path", ib),
    }
    wanted = list(made) if columns is None else [c for c in made if c in set(columns)]
    out = pd.DataFrame({c: made[c]() for c in wanted}, index=pd.RangeIndex(len(pairs)))
    return out if in_order else out.take(output_order(pairs, images)).reset_index(drop=True)


# distribution names whose versions shape the results (read from package metadata: nothing is
# imported, so the driver does not pay for TensorFlow just to name its version)
VERSIONED = {"numpy": ["numpy"], "pillow": ["pillow"], "imagehash": ["imagehash"],
             "opencv": ["opencv-python-headless", "opencv-python"], "pandas": ["pandas"],
             "pyarrow": ["pyarrow"], "dask": ["dask"], "distributed": ["distributed"], "numba": ["numba"],
             "tensorflow": ["tensorflow-cpu", "tensorflow"], "keras": ["keras"],
             "faiss": ["faiss-cpu", "faiss"], "scipy": ["scipy"]}


def versions() -> dict:
    from importlib import metadata
    found = {"python": platform.python_version(), "dedupe-pipeline": pipeline.__version__}
    for name, dists in VERSIONED.items():
        for dist in dists:
            try:
                found[name] = metadata.version(dist)
                break
            except metadata.PackageNotFoundError:
                continue
        else:
            found[name] = None  # not installed
    return found
