"""A real external Dask cluster on 127.0.0.1: one `dask scheduler` process and `dask worker`
processes, each in a folder of its own (no shared working directory), as on a cluster whose
machines share no disk. Used by the benchmarks that measure such a run and by the tests that run
the pipeline through a scheduler's address."""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from distributed import WorkerPlugin

DASK = Path(sys.executable).parent / "dask"


@dataclass
class Worker:
    """One `dask worker` process: `nworkers` worker processes of one thread each, run in `folder`
    (also their --local-directory), with `env` (default: the cluster's)."""
    folder: Path
    nworkers: int = 1
    env: dict | None = None
    name: str | None = None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def external_cluster(env: dict, scheduler_folder: Path, workers: Sequence[Worker],
                     timeout: float = 120) -> Iterator[tuple[str, int]]:
    """Start the scheduler (in `scheduler_folder`) and `workers`, wait until every worker process
    has joined, yield (address, the scheduler's pid); stop them all on exit. `env` carries what
    the workers need to unpickle the tasks (PYTHONPATH of the tree under test, KERAS_HOME)."""
    # the scheduler picks its own port and writes its address to a file: a port chosen here and
    # freed before the scheduler bound it could be taken meanwhile (a worker starting alongside,
    # a store's server), and the client then waited on a server that never answers it
    address_file = Path(scheduler_folder) / f"scheduler-{os.getpid()}-{time.monotonic_ns()}.json"
    procs = [subprocess.Popen([str(DASK), "scheduler", "--host", "127.0.0.1", "--port", "0",
                               "--dashboard-address", ":0", "--scheduler-file", str(address_file)],
                              cwd=scheduler_folder, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        from distributed.utils import json_load_robust  # (waits for the file, whole)
        address = json_load_robust(str(address_file), timeout=timeout)["address"]
        for w in workers:
            cmd = [str(DASK), "worker", address, "--nworkers", str(w.nworkers), "--nthreads", "1",
                   "--host", "127.0.0.1", "--dashboard-address", ":0", "--local-directory", str(w.folder)]
            if w.name:
                cmd += ["--name", w.name]
            procs.append(subprocess.Popen(cmd, cwd=w.folder, env=w.env if w.env is not None else env,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        from distributed import Client
        with Client(address, timeout="60s") as client:
            if workers:  # (none: a scheduler alone)
                client.wait_for_workers(sum(w.nworkers for w in workers), timeout=timeout)
        yield address, procs[0].pid
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in reversed(procs):
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        address_file.unlink(missing_ok=True)


class KillOnce(WorkerPlugin):
    """A Dask worker plugin (register it with `client.register_plugin`) that kills its worker
    process with SIGKILL the first time, cluster-wide, that the worker starts a task running one of
    the functions `names` (by __name__: the task's own function or one passed to it, as the
    pipeline's task runner does), as a machine lost mid-task would (the nanny then starts a fresh
    worker). Each name kills once: a marker file in `folder`, which every worker must see, records
    it (holding the killed process's pid). `for_good`: its nanny too (the `dask worker` process
    that would start a fresh one), as a machine that does not come back."""

    name = "dedupe-kill-once"

    def __init__(self, names: Sequence[str], folder: str | Path, for_good: bool = False):
        self.names, self.folder, self.for_good = set(names), str(folder), for_good

    def setup(self, worker) -> None:
        self.worker = worker

    def transition(self, key, start, finish, **kwargs) -> None:
        if finish != "executing":
            return
        ts = self.worker.state.tasks.get(key)
        spec = getattr(ts, "run_spec", None)
        found = {getattr(x, "__name__", None) for x in (getattr(spec, "func", None), *(getattr(spec, "args", None) or ()))}
        for name in sorted(self.names & found):
            try:  # once per name, whichever worker gets there first
                fd = os.open(Path(self.folder) / f"killed-{name}", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                continue
            os.write(fd, str(os.getpid()).encode())
            os.close(fd)
            if self.for_good:
                os.kill(os.getppid(), signal.SIGKILL)
            os.kill(os.getpid(), signal.SIGKILL)
