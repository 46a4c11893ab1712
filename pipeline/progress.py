"""Progress that tells the truth, on a terminal and in a batch log, and the task runner that feeds it.

On a terminal: one tqdm bar per stage with its total, advanced as each task finishes. Without a
terminal (cron, Airflow, systemd): a log line when a stage starts and ends, and a heartbeat line
(done/total, rate, ETA) every `heartbeat_s` seconds while it runs, from a timer thread, so a long
task with nothing finishing still shows the job is alive.

`map_tasks` runs one function over a list of tasks on a Dask client (or in this process) and
advances a tracker as each task completes; stages use it instead of a bare `client.gather`.
"""
from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
from typing import Callable, Iterator, Sequence

log = logging.getLogger("pipeline")


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 \
        else f"{seconds // 60}:{seconds % 60:02d}"


class Tracker:
    """One stage's counter. `update(n)` as work finishes; `set_total(n)` when the total becomes
    known or grows (the screen learns its total as the walk goes on)."""

    def __init__(self, name: str, total: int | None, unit: str, bar=None):
        self.name, self.total, self.unit, self.bar = name, total, unit, bar
        self.done = 0
        self.started = time.monotonic()
        self.total_final = total is not None
        self._lock = threading.Lock()

    def update(self, n: int = 1) -> None:
        with self._lock:
            self.done += n
        if self.bar is not None:
            self.bar.update(n)

    def set_total(self, total: int, final: bool = True) -> None:
        self.total, self.total_final = total, final
        if self.bar is not None:
            self.bar.total = total
            self.bar.refresh()

    def status(self) -> str:
        elapsed = time.monotonic() - self.started
        rate = self.done / elapsed if elapsed > 0 else 0.0
        if self.total is None:
            return f"{self.name}: {self.done} {self.unit} done, {rate:.1f} {self.unit}/s, {_duration(elapsed)} elapsed"
        total = f"{self.total}" if self.total_final else f"{self.total}+ (still counting)"
        pct = 100.0 * self.done / self.total if self.total else 100.0
        eta = ""
        if self.total_final and rate > 0 and self.done < self.total:
            eta = f", ETA {_duration((self.total - self.done) / rate)}"
        return (f"{self.name}: {self.done}/{total} {self.unit} ({pct:.0f}%), {rate:.1f} {self.unit}/s, "
                f"{_duration(elapsed)} elapsed{eta}")


class Stopped(BaseException):
    """SIGTERM (or SIGINT) received: unwinds the run like Ctrl-C does (a BaseException, so no
    stage's `except Exception` can swallow it), running every `finally` that removes temporary
    files. Raised by the CLI's signal handler (pipeline/cli.py), and again by `raise_if_stopped`."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class StopState:
    """What the CLI's signal handler has seen during the run. A handler's exception raised while the
    garbage collector runs a callback (Dask's GC diagnosis, with a local cluster) is printed and
    dropped ("Exception ignored in ... _gc_callback"), and the run went on to exit 0: the signal
    is remembered here and raised again at the next stage boundary and before the outputs are
    published (`raise_if_stopped`). Once they are published (`published`) a signal no longer
    stops the run: it has succeeded (exit 1 there made Airflow retry it)."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.signum: int | None = None
        self.published = False
        self.holding = False  # (the commit point: a signal is noted, not raised; `commit_point`)


STOP = StopState()


def raise_if_stopped() -> None:
    """Raise `Stopped` when a stop signal came and the run is still going (its first raise lost)."""
    if STOP.signum is not None and not STOP.published:
        raise Stopped(STOP.signum)


@contextlib.contextmanager
def commit_point() -> Iterator[None]:
    """Around the one step that makes a run's outputs the current ones: a stop signal that came
    before it (its raise lost) stops the run here; one that comes during it is noted, not raised
    (raised there, after the switch and before the run knew, it said the previous outputs were
    untouched, and OUT's links were not made); once it has succeeded the run is published."""
    raise_if_stopped()
    STOP.holding = True
    try:
        yield
        STOP.published = True
    finally:
        STOP.holding = False


class Progress:
    """Stage trackers: tqdm bars on a terminal, start/heartbeat/end log lines otherwise.

    `quiet` turns the bars and heartbeats off (start and end lines stay, at INFO)."""

    def __init__(self, quiet: bool = False, heartbeat_s: float = 30.0, stream=None):
        stream = stream if stream is not None else sys.stderr
        self.quiet = quiet
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self.heartbeat_s = heartbeat_s

    @contextlib.contextmanager
    def stage(self, name: str, total: int | None = None, unit: str = "it") -> Iterator[Tracker]:
        raise_if_stopped()
        bar = None
        with contextlib.ExitStack() as shown:
            if self.tty and not self.quiet:
                from tqdm import tqdm
                from tqdm.contrib.logging import logging_redirect_tqdm
                # log lines above the bar, not written into its line ("...img/s]2026-12-07 ... INFO")
                shown.enter_context(logging_redirect_tqdm())
                bar = tqdm(total=total, desc=f"{name:<10}", unit=unit, leave=True, dynamic_ncols=True)
                shown.callback(bar.close)
            with self._tracked(name, total, unit, bar) as tracker:
                yield tracker

    @contextlib.contextmanager
    def _tracked(self, name: str, total: int | None, unit: str, bar) -> Iterator[Tracker]:
        tracker = Tracker(name, total, unit, bar)
        log.info("%s: started%s", name, "" if total is None else f" ({total} {unit})")
        stop = threading.Event()
        beat = None
        if bar is None and not self.quiet:
            def heartbeat():
                while not stop.wait(self.heartbeat_s):
                    log.info("%s", tracker.status())
            beat = threading.Thread(target=heartbeat, name=f"heartbeat-{name}", daemon=True)
            beat.start()
        try:
            yield tracker
        finally:
            stop.set()
            if beat is not None:
                beat.join(timeout=1)
            if bar is not None:
                bar.close()
        elapsed = time.monotonic() - tracker.started
        log.info("%s: finished %d %s in %.1fs", name, tracker.done, unit, elapsed)



@contextlib.contextmanager
def silent_stage(name: str, total: int | None = None, unit: str = "it") -> Iterator[Tracker]:
    """A tracker that reports nothing (stages called without a Progress, e.g. from tests)."""
    yield Tracker(name, total, unit)


def stage_of(progress: Progress | None):
    """`progress.stage`, or a silent one when there is no Progress."""
    return progress.stage if progress is not None else silent_stage


_local_threads = threading.local()


@contextlib.contextmanager
def in_process_threads(n: int) -> Iterator[None]:
    """Tasks run in this process (no client) go to a pool of `n` threads while this is active
    (the "auto" scheduler's small-work path: decode, OpenCV, the numba matcher and TensorFlow
    release the GIL, so a second core is used without starting a cluster). Results keep the task
    order, so outputs are the same as one thread's."""
    from concurrent.futures import ThreadPoolExecutor
    previous = getattr(_local_threads, "pool", None)
    with ThreadPoolExecutor(max_workers=max(1, n), thread_name_prefix="in-process") as pool:
        _local_threads.pool = pool if n > 1 else None
        try:
            yield
        finally:
            _local_threads.pool = previous


def thread_pool():
    """The active `in_process_threads` pool of this thread, or None."""
    return getattr(_local_threads, "pool", None)


def _call_task(task, fn: Callable, star: bool, args: tuple):
    return fn(*task, *args) if star else fn(task, *args)


# tasks whose data `map_tasks` scatters at once: scattering 256 verify-like tasks of 512k pairs
# in one call took the driver's RSS up 143 MiB (97 MiB of it kept), 16 at a time 49 MiB, in
# about the same time (docs/benchmarks.md, "driver memory of sending tasks to a cluster")
SCATTER_TASKS = 16

# tasks sent at a time per worker thread by a stage that makes its tasks as they are sent (the
# verify and confirm tiers' pair tasks, `map_tasks(in_flight=...)`, at least two scatters' worth):
# enough queued on every thread that none waits for the driver to make the next
TASKS_IN_FLIGHT_PER_THREAD = 4


def tasks_in_flight(client) -> int:
    """How many such tasks to have sent at once on `client` (None: this process's pool)."""
    threads = 2 if client is None else max(1, sum(client.nthreads().values()))
    return max(2 * SCATTER_TASKS, TASKS_IN_FLIGHT_PER_THREAD * threads)


WORKER_WAIT_S = 60.0  # how long a run waits for a worker on a cluster that has none (first, or all left)


class NoWorkers(RuntimeError):
    """Every worker left the Dask cluster and none came back within WORKER_WAIT_S: the run stops
    (exit 1) with this message instead of Dask's "No valid workers found" traceback."""


def scatter(client, data, **kwargs):
    """`client.scatter(data, **kwargs)`; on a cluster whose workers have all left (killed for
    memory, a spot fleet reclaimed), wait up to WORKER_WAIT_S for one to join (a nanny's restart,
    an autoscaler) and scatter there, else raise NoWorkers saying what happened."""
    try:
        return client.scatter(data, **kwargs)
    except TimeoutError:  # (the scheduler's "No valid workers found", after a short wait of its own)
        if client.scheduler_info().get("workers"):
            raise
    log.warning("no worker is left on the Dask cluster: waiting up to %.0f s for one", WORKER_WAIT_S)
    try:
        client.wait_for_workers(1, timeout=WORKER_WAIT_S)
    except TimeoutError:
        address = getattr(getattr(client, "scheduler", None), "address", None) or "(the scheduler)"
        raise NoWorkers(f"every worker left the Dask cluster at {address} and none came back within "
                        f"{WORKER_WAIT_S:.0f} s (see the workers' logs: killed for memory?); start workers "
                        "and run again") from None
    return client.scatter(data, **kwargs)


RESENDS = 3  # times a task is sent again after a lost worker took its data or result with it
# why Dask cancels a task when the driver, not a worker, went away: never resent
NOT_A_LOST_WORKER = ("scheduler-connection-lost", "scheduler-restart", "client-cancel", "cancel")


def lost_with_a_worker(exc: BaseException, client) -> bool:
    """A cancelled task whose data or result a worker that left took with it (Dask: "already
    forgotten"), not one cancelled because this client lost its scheduler or cancelled it."""
    reason = str(getattr(exc, "reason", "") or "")
    return getattr(client, "status", "running") == "running" and not reason.startswith(NOT_A_LOST_WORKER)


class Sent:
    """Tasks on a Dask cluster, each task's data scattered to the workers rather than put inside
    the task, where the scheduler holds it and the client's and the in-process scheduler's message
    logs keep it (a report's thumbnail tasks: ~13 MB of the driver's peak at 100k files), and sent
    SCATTER_TASKS at a time (one scatter of every task serializes them all at once, into one
    message per worker). hash=False: fresh keys, so a repeated call never shares data with a
    finished one.

    Scattered data lives on one worker only, and Dask cannot make it again: a worker that dies
    (killed for memory, a spot machine reclaimed, kill -9) takes it with it, and its tasks end
    "cancelled" (also those already finished whose results it held). So each task's data is kept
    here, pickled, until its result has been fetched, and a task lost that way is sent again, up to
    RESENDS times (then the run fails, naming the task: something kills every worker that runs it)."""

    def __init__(self, client):
        from distributed import as_completed
        from distributed.protocol import pickle
        self._dumps, self._loads = pickle.dumps, pickle.loads  # (Dask's: cloudpickle where pickle cannot)
        self.client = client
        self._pending = as_completed(loop=client.loop)  # (the client need not be the default one)
        self._held: dict[str, tuple] = {}  # future key -> (number, fn, task pickled, star, args, sends)

    def __len__(self) -> int:
        return len(self._held)

    def send(self, items: Sequence[tuple[int, Callable, object]], star: bool = False, args: tuple = (),
             sends: int = 1) -> None:
        """Send each (number, fn, task): fn(task, *args), or fn(*task, *args) with `star`."""
        items = list(items)
        for start in range(0, len(items), SCATTER_TASKS):
            chunk = items[start:start + SCATTER_TASKS]
            data = scatter(self.client, [task for _, _, task in chunk], hash=False)
            futures = self.client.map(_call_task, data, [fn for _, fn, _ in chunk], star=star, args=args, pure=False)
            for (n, fn, task), fut in zip(chunk, futures):
                # kept as one pickled blob, not the objects: a screen task's file entries are
                # thousands of small objects, freed only as each task ends, among whose holes the
                # tasks' results land (Python's small-object arenas, ~1 MiB each, then stay)
                self._held[fut.key] = (n, fn, self._dumps(task), star, args, sends)
                self._pending.add(fut)

    def results(self, block: bool = True) -> Iterator[tuple[int, object]]:
        """(number, result) of each task as it finishes, in no set order (`block=False`: only
        those finished by now); a task's exception is raised here, with its traceback. A task's
        data is let go of once its result is fetched."""
        from concurrent.futures import CancelledError
        finished = self._pending if block else self._pending.next_batch(block=False)
        for fut in finished:
            n, fn, blob, star, args, sends = self._held.pop(fut.key)
            try:
                result = fut.result()
            except CancelledError as exc:  # its worker left with the task's data (or its result)
                if not lost_with_a_worker(exc, self.client):
                    raise
                if sends > RESENDS:
                    raise RuntimeError(f"task {n} ({getattr(fn, '__name__', fn)}) was lost with its worker "
                                       f"{sends} times: a worker running it dies (memory? see the workers' "
                                       "logs)") from exc
                log.warning("a worker left the cluster with the data of task %d (%s): sending it again",
                            n, getattr(fn, "__name__", fn))
                self.send([(n, fn, self._loads(blob))], star, args, sends + 1)
                continue
            del fut, blob
            yield n, result


def again_if_lost(what: str, fn: Callable[[], object]):
    """fn() run again (up to RESENDS times) when a worker that left the cluster took scattered
    data it needed with it (Dask cancels the tasks that need it): for a step whose tasks pass data
    between them on the workers (the sharded candidate search), which is made again whole."""
    from concurrent.futures import CancelledError
    for sends in range(1, RESENDS + 2):
        try:
            return fn()
        except CancelledError as exc:
            if not lost_with_a_worker(exc, None):
                raise
            if sends > RESENDS:
                raise RuntimeError(f"{what} lost a worker {sends} times: a worker running it dies (memory? "
                                   "see the workers' logs)") from exc
            log.warning("a worker left the cluster during %s: running it again", what)


def map_tasks(client, fn: Callable, tasks: Sequence, *args, tracker: Tracker | None = None,
              weight: Callable[[object], int] = lambda task: 1, star: bool = False,
              each: Callable[[int, object], None] | None = None, in_flight: int | None = None) -> list:
    """[fn(task, *args) for task in tasks] (`star`: fn(*task, *args)), on the Dask `client` when
    given, else in this process (on the `in_process_threads` pool when one is active); results
    in task order. `tracker.update(weight(task))` as each task finishes.

    `each(number, result)`: called with each task's result as it finishes, in no set order, and
    the result is not kept (returns an empty list): for a caller that copies the results into
    arrays of its own, which then never holds them all at once besides.

    `in_flight`: at most this many tasks sent (or queued on the pool) at a time, the next taken
    from `tasks` as one ends: `tasks` may then be a sequence that makes each task only when it is
    indexed (e.g. verify's pair tasks), and this process holds the data of those in flight only."""
    if not (hasattr(tasks, "__len__") and hasattr(tasks, "__getitem__")):
        tasks = list(tasks)
    n_tasks = len(tasks)
    window = n_tasks if in_flight is None else max(1, int(in_flight))
    results: list = [None] * n_tasks if each is None else []
    weights: dict[int, int] = {}  # task number -> its weight, taken as it is sent
    numbers = iter(range(n_tasks))  # the tasks not yet taken

    def take(count: int) -> list[tuple[int, object]]:
        out = []
        for n in numbers:
            task = tasks[n]
            weights[n] = weight(task)
            out.append((n, task))
            if len(out) >= count:
                break
        return out

    def done(n: int, result) -> None:
        if each is None:
            results[n] = result
        else:
            each(n, result)
        w = weights.pop(n)
        if tracker is not None:
            tracker.update(w)

    if client is None:
        pool = thread_pool()
        if pool is not None and n_tasks > 1:
            from queue import SimpleQueue
            # (each task's future put here as it ends: one blocking get a task, which a signal's
            # exception, e.g. SIGTERM's, interrupts cleanly; a wait() over the running futures
            # per task took every one's lock each time)
            finished: SimpleQueue = SimpleQueue()
            running = 0

            def submit(count: int) -> None:
                nonlocal running
                for n, task in take(count):
                    fut = pool.submit(fn, *task, *args) if star else pool.submit(fn, task, *args)
                    fut.add_done_callback(lambda f, n=n: finished.put((n, f)))
                    running += 1
            submit(window)
            while running:
                n, fut = finished.get()
                running -= 1
                done(n, fut.result())  # (a task's exception here, with its traceback)
                del fut
                submit(window - running)
            return results
        while items := take(1):  # (each task made as it is run)
            [(n, task)] = items
            done(n, fn(*task, *args) if star else fn(task, *args))
            del items, task
        return results
    if not n_tasks:
        return results
    sent = Sent(client)

    def send(count: int) -> None:
        items = take(count)
        if items:
            sent.send([(n, fn, task) for n, task in items], star, args)
    send(window)
    for n, result in sent.results():
        done(n, result)
        del result
        # topped up a scatter's worth at a time, while half the window is still queued on the
        # workers (topped up only once all had ended, the workers would wait at every refill)
        if len(sent) <= window - min(SCATTER_TASKS, max(1, window // 2)):
            send(window - len(sent))
    return results


def completed(client, tasks: Sequence[tuple[Callable, tuple]], threads: int = 1) -> Iterator[tuple[int, object]]:
    """(task number, result) of each task (fn, args) as it finishes, in no set order: on the Dask
    `client`'s workers when given (each result fetched as its task ends and released once the
    caller moves on, so this process holds only what the caller keeps), else on `threads` threads
    of this process, two tasks a thread in flight: tasks that end faster than the caller writes
    their results out would pile their results up here (the report's thumbnails taken from
    feature parts, ~1 MB a part: ~+110 MB of a 100k-file run's driver with all tasks submitted)."""
    if not tasks:
        return
    if client is None:
        from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
        threads = max(1, threads)
        queue = iter(enumerate(tasks))
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="tasks") as pool:
            running: dict = {}  # future -> task number

            def top_up() -> None:
                for n, (fn, args) in queue:
                    running[pool.submit(fn, *args)] = n
                    if len(running) >= 2 * threads:
                        return
            top_up()
            while running:
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                while done:  # (each result let go of once handed over)
                    fut = done.pop()
                    n = running.pop(fut)
                    top_up()  # (the threads go on while the caller handles this result)
                    result = fut.result()
                    del fut
                    yield n, result
                    del result
        return
    sent = Sent(client)
    sent.send([(n, fn, args) for n, (fn, args) in enumerate(tasks)], star=True)
    del tasks  # (sent keeps each task's data until its result is fetched, then lets go of it)
    yield from sent.results()
