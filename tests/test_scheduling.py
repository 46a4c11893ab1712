"""Fixed cost: the "auto" scheduler (in-process for small work, a local cluster started during the
walk otherwise, same outputs), nothing heavy imported where it is not used, the model built once
per process and reused across stages and runs, and no pair verified twice."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from pipeline import confirm, run, verify
from pipeline.config import load_config

REPO = Path(__file__).resolve().parent.parent


def _frames(out: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    images = pd.read_parquet(out / "images.parquet").drop(columns=["mtime"])
    pairs = pd.read_parquet(out / "pairs.parquet")
    return images, pairs


@pytest.fixture(scope="module")
def data(labelled_dir) -> Path:
    return labelled_dir / "threatexchange_pdq"  # 37 files: edits, rotations, EXIF turns, negatives


@pytest.mark.slow
def test_auto_runs_small_work_in_process_and_large_on_a_cluster_with_the_same_outputs(data, tmp_path):
    base = ["tiers=verify", "catalog=none", "dask.dashboard_address="]
    small = run.run(data, tmp_path / "small", load_config(None, base), quiet=True)
    assert small["scheduler"] == "auto" and small["scheduler_used"] == "sync"
    # a limit below the folder's size: the cluster starts during the walk and gets every task
    large = run.run(data, tmp_path / "large", load_config(None, base + ["dask.auto_max_files=5",
                                                                        "dask.partition_size=4"]), quiet=True)
    assert large["scheduler_used"] == "local"
    for a, b in zip(_frames(tmp_path / "small"), _frames(tmp_path / "large")):
        pd.testing.assert_frame_equal(a, b)
    assert large["counts"]["files"] == small["counts"]["files"] == 37
    assert small["counts"]["verified_pairs"] > 0


def test_auto_with_nothing_to_screen_never_starts_a_cluster(data, tmp_path):
    """A catalog rerun that reads no file stays in-process (no cluster start for a no-op)."""
    cfg = load_config(None, ["tiers=screen", "dask.auto_max_files=0", "dask.dashboard_address="])
    first = run.run(data, tmp_path / "out", cfg, quiet=True)
    assert first["scheduler_used"] == "local"
    again = run.run(data, tmp_path / "out", cfg, quiet=True)
    assert again["reuse"]["screen"]["screened"] == 0
    assert again["scheduler_used"] == "sync"


def _tasks_in_scheduler_log(dask_scheduler) -> list[bytes]:
    """The compute-task messages the scheduler's streams to its workers keep in their logs
    (distributed.admin.low-level-log-length), pickled."""
    import pickle
    return [pickle.dumps(msg["run_spec"].data) for stream in dask_scheduler.stream_comms.values()
            for payload in stream.recent_message_log if isinstance(payload, list)
            for msg in payload if isinstance(msg, dict) and msg.get("op") == "compute-task"]


def _tasks_in_client_log(client) -> list[bytes]:
    """The task graphs the client's stream to the scheduler keeps in its log, as sent."""
    return [b"".join(bytes(frame) for frame in msg["expr_ser"].frames)
            for payload in client.scheduler_comm.recent_message_log if isinstance(payload, list)
            for msg in payload if isinstance(msg, dict) and msg.get("op") == "update-graph"]


def test_screen_on_a_cluster_counts_every_file_and_fetches_each_partition_once(data, tmp_path, caplog,
                                                                               monkeypatch):
    """The screen's progress counts a task's files as it ends, when its frame is fetched (kept
    until then with the task's data, so a task a lost worker took can be sent again): every file
    is counted, each partition crosses to the driver once, and the frame is the in-process one. The file lists go to the workers as data,
    so the tasks the client's and the scheduler's message logs keep hold no file entry."""
    import logging
    import shutil

    from distributed import Client, Future, LocalCluster

    from pipeline.progress import Progress
    folder = tmp_path / "data"
    shutil.copytree(data, folder)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")  # an error row is counted too
    cfg = load_config(None, ["dask.partition_size=4", "dask.dashboard_address="])
    here = run.run_screen(folder, cfg, None, Progress(quiet=True))
    fetched = []
    result = Future.result
    monkeypatch.setattr(Future, "result", lambda self, *a, **k: fetched.append(self.key) or result(self, *a, **k))
    caplog.set_level(logging.INFO, logger="pipeline")
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        images = run.run_screen(folder, cfg, client, Progress(quiet=True))
        kept = client.run_on_scheduler(_tasks_in_scheduler_log) + _tasks_in_client_log(client)
    assert len(fetched) == len(set(fetched)) >= 3  # each task's frame fetched once, as it ended
    # the file lists went to the workers as data: the tasks the message logs keep name no file
    names = [p.name.encode() for p in folder.rglob("*") if p.is_file()]
    assert len(kept) >= 3 and not [n for n in names if any(n in task for task in kept)]
    finished = [r.getMessage() for r in caplog.records if r.getMessage().startswith("screen: finished")]
    assert len(finished) == 1 and finished[0].startswith(f"screen: finished {len(here)} img"), finished
    assert len(here) > 3 * 4 and here["error"].notna().sum() >= 1  # several tasks, an error row among them
    pd.testing.assert_frame_equal(images, here)


def _echo_names(names: list[str], suffix: str) -> dict[str, str]:
    return {name: name + suffix for name in names}


def test_completed_yields_every_task_once_and_its_arguments_travel_as_data():
    """progress.completed (the report's pixel work) on a cluster: every task's result once, under
    its own number, more tasks than are scattered at a time; the task arguments (the report's
    file lists) go to the workers as data, so the tasks the message logs keep name no file, and
    the generator lets go of them once sent."""
    from distributed import Client, LocalCluster

    from pipeline.progress import SCATTER_TASKS, completed
    tasks = [(_echo_names, ([f"thumb-{n:03d}-{i}.jpg" for i in range(3)], f"#{n}"))
             for n in range(2 * SCATTER_TASKS + 3)]
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        got = dict(completed(client, tasks))
        kept = client.run_on_scheduler(_tasks_in_scheduler_log) + _tasks_in_client_log(client)
        # once sent, the generator holds none of the tasks' data (the report frees its file lists)
        pending = completed(client, [(_echo_names, (["x.jpg"], f"#{n}")) for n in range(3)])
        first = next(pending)
        assert "tasks" not in pending.gi_frame.f_locals
        assert sorted([first, *pending]) == [(n, {"x.jpg": f"x.jpg#{n}"}) for n in range(3)]
    assert sorted(got) == list(range(len(tasks)))
    assert all(got[n] == {name: name + f"#{n}" for name in tasks[n][1][0]} for n in got)
    assert len(kept) >= 3 and not [n for n in range(len(tasks)) if any(f"thumb-{n:03d}".encode() in t for t in kept)]


def test_completed_in_process_keeps_two_tasks_a_thread_ahead_of_the_caller():
    """progress.completed without a cluster: every task's result once, and a caller slower than
    the tasks (the report writing thumbnails out) never has more than two tasks a thread started
    and not yet handed to it, so finished results do not pile up in the process."""
    import threading
    import time

    from pipeline.progress import completed
    started, lock = [0], threading.Lock()

    def task(n: int) -> bytes:
        with lock:
            started[0] += 1
        return bytes(1000) + n.to_bytes(4, "little")

    threads, got, ahead = 2, {}, []
    for n, result in completed(None, [(task, (n,)) for n in range(60)], threads=threads):
        got[n] = result
        time.sleep(0.002)  # (the caller writing a result out)
        with lock:
            ahead.append(started[0] - len(got))
    assert sorted(got) == list(range(60)) and all(got[n].endswith(n.to_bytes(4, "little")) for n in got)
    assert max(ahead) <= 2 * threads, ahead


@pytest.mark.slow
def test_no_tensorflow_in_the_driver_or_the_workers_of_a_verify_run(data, tmp_path):
    """Screen and verify never import TensorFlow (seconds per process, and memory): checked in a
    fresh driver process and in every worker of the cluster it ran on."""
    from distributed import Client, LocalCluster
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        script = ("import sys, json; from pipeline import run; from pipeline.config import load_config\n"
                  "m = run.run(sys.argv[1], sys.argv[2], load_config(None, ['tiers=verify', 'catalog=none']),"
                  " scheduler=sys.argv[3], quiet=True)\n"
                  "print(json.dumps({'verified': m['counts']['verified_pairs'],"
                  " 'heavy': sorted(m for m in ('tensorflow', 'keras') if m in sys.modules)}))")
        proc = subprocess.run([sys.executable, "-c", script, str(data), str(tmp_path / "out"),
                               cluster.scheduler_address], capture_output=True, text=True, cwd=REPO,
                              env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        driver = json.loads(proc.stdout.strip().splitlines()[-1])
        assert driver["verified"] > 0 and driver["heavy"] == []
        workers = client.run(lambda: sorted(m for m in ("tensorflow", "keras") if m in sys.modules))
        assert len(workers) == 2 and all(found == [] for found in workers.values()), workers
        ran = client.run(lambda: "pipeline.verify" in sys.modules)
        assert all(ran.values())  # the workers did run the verify tier


def test_on_a_cluster_the_driver_compiles_no_search_kernel_and_finds_the_same_pairs(data, tmp_path):
    """With a cluster, the hash search's index is built and searched on the workers (one index
    below screen.search_shard_size, a copy on each worker), each pair's best distance over the
    variants is computed there, and a catalog re-run re-derives its lists there too: a fresh driver
    process does not even import numba (the kernels live in pipeline/hamming.py, imported where
    they run; numba and LLVM are ~50 MB of a process's memory, a compiled kernel ~66 MB more),
    first run or re-run, and writes the pairs of an in-process run."""
    import shutil

    from distributed import Client, LocalCluster
    from PIL import Image
    folder = tmp_path / "data"
    shutil.copytree(data, folder)
    script = ("import sys, json; from pipeline import candidates, run, search, verify\n"
              "from pipeline.config import load_config\n"
              "m = run.run(sys.argv[1], sys.argv[2], load_config(None, ['tiers=screen']), scheduler=sys.argv[3],"
              " quiet=True)\n"
              "print(json.dumps({'near': m['counts']['near_candidates'], 'search': m['reuse']['candidates'],"
              " 'compiled': sorted(m for m in ('numba', 'llvmlite', 'pipeline.hamming') if m in sys.modules)}))")
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        def driver() -> dict:
            proc = subprocess.run([sys.executable, "-c", script, str(folder), str(tmp_path / "cluster"),
                                   cluster.scheduler_address], capture_output=True, text=True, cwd=REPO,
                                  env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=600)
            assert proc.returncode == 0, proc.stderr[-3000:]
            return json.loads(proc.stdout.strip().splitlines()[-1])
        first = driver()
        assert first["near"] > 0 and first["compiled"] == [], first
        source = next(p for p in sorted(folder.rglob("*")) if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        with Image.open(source) as im:  # a new, edited copy: the re-run searches for its neighbours
            im.convert("RGB").resize((im.width * 3 // 4, im.height * 3 // 4)).save(folder / "added-copy.jpg",
                                                                                 quality=80)
        again = driver()
        assert again["search"].get("added") == 1 and again["search"].get("lists_reused", 0) > 0, again
        assert again["near"] > first["near"] and again["compiled"] == [], again

        def kernels_run_here():
            from pipeline import hamming
            return bool(hamming.pair_best.signatures), bool(hamming.mih_search.signatures)
        ran = client.run(kernels_run_here)
        assert any(pair for pair, _ in ran.values()) and any(mih for _, mih in ran.values()), ran
    run.run(folder, tmp_path / "here", load_config(None, ["tiers=screen", "catalog=none"]), scheduler="sync",
            quiet=True)
    pd.testing.assert_frame_equal(_frames(tmp_path / "cluster")[1], _frames(tmp_path / "here")[1])


def test_the_model_is_built_once_per_process_across_stages_and_runs(review_data, tmp_path, monkeypatch):
    """High-recall mode embeds at the screen and again at confirm, and a second run in the same
    process (a catalog's next run) embeds again: one model in the process cache, the same object
    throughout (whatever embedder class the runtime picks)."""
    models: dict = {}
    monkeypatch.setattr(confirm, "_MODELS", models)
    cfg = load_config(None, ["screen.mode=hash+embedding", "screen.embedding_min_cosine=0.3"])
    first = run.run(review_data, tmp_path / "a", cfg, quiet=True)
    assert first["scheduler_used"] == "sync"
    assert first["counts"]["screen_embedded"] > 0 and first["counts"]["confirmed_pairs"] > 0
    assert len(models) == 1
    built = next(iter(models.values()))
    run.run(review_data, tmp_path / "b", cfg, quiet=True)
    assert len(models) == 1 and next(iter(models.values())) is built


def test_no_pair_is_verified_twice(data, tmp_path, monkeypatch):
    """Every near candidate is matched exactly once, in one task, however many hash variants
    (plain, flipped, turned, trimmed) found it, and exact copies are not matched at all."""
    seen: list[tuple[int, int]] = []
    real = verify.verify_partition

    def spy(pairs, cfg, reference=False):
        seen.extend(zip(pairs["key_a"].tolist(), pairs["key_b"].tolist()))
        return real(pairs, cfg, reference)

    monkeypatch.setattr(verify, "verify_partition", spy)
    cfg = load_config(None, ["tiers=verify", "catalog=none", "dask.pairs_per_task=7"])
    manifest = run.run(data, tmp_path / "out", cfg, scheduler="sync", quiet=True)
    images = [k // 8 for pair in seen for k in pair]
    assert len(seen) == manifest["counts"]["verified_pairs"] > 20
    assert len({(a // 8, b // 8) for a, b in seen}) == len(seen)  # one row per image pair
    assert len(set(images)) > 10


def test_local_cluster_workers_keep_the_default_allocator_thresholds(monkeypatch):
    """The pipeline's local cluster does not pass Dask's MALLOC_TRIM_THRESHOLD_=65536 to its
    workers (it pins glibc's mmap threshold: image buffers are faulted in afresh each time); a
    value the user sets in the environment still reaches them."""
    import os

    from pipeline.config import load_config
    from pipeline.run import dask_client

    cfg = load_config(None, ["dask.n_workers=1", "dask.dashboard_address="])
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    with dask_client(cfg, "local") as client:
        assert set(client.run(os.environ.get, "MALLOC_TRIM_THRESHOLD_").values()) == {None}
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1048576")
    with dask_client(cfg, "local") as client:
        assert set(client.run(os.environ.get, "MALLOC_TRIM_THRESHOLD_").values()) == {"1048576"}


def _log_from_the_worker(message: str) -> None:
    import logging
    try:
        raise OSError("Timed out trying to connect to tcp://127.0.0.1:1")
    except OSError:
        logging.getLogger("distributed.worker").exception(message)


def test_local_cluster_workers_do_not_print_the_heartbeat_traceback_of_a_closing_scheduler(capfd):
    """The local cluster's scheduler lives in the driver: when it closes before a worker (Ctrl-C
    under load) the worker's failed heartbeat printed distributed's traceback. The workers drop
    that record (`run.SchedulerGoneFilter`) and still print every other."""
    from pipeline.config import load_config
    from pipeline.run import dask_client

    cfg = load_config(None, ["dask.n_workers=1", "dask.dashboard_address="])
    with dask_client(cfg, "local") as client:
        client.run(_log_from_the_worker, "Failed to communicate with scheduler during heartbeat.")
        client.run(_log_from_the_worker, "another worker error")
    err = capfd.readouterr().err
    assert "another worker error" in err and "OSError: Timed out" in err, err[-2000:]
    assert "during heartbeat" not in err, err[-2000:]


@pytest.mark.parametrize("off", ["", "none"])
def test_a_local_cluster_without_a_dashboard_leaves_its_port_alone(off):
    """dask.dashboard_address "" (documented as no dashboard) still took :8787 (Dask's default for
    None), and "none" was taken for a host name: the cluster failed to start."""
    cfg = load_config()
    cfg.dask.dashboard_address = off
    cfg.dask.n_workers, cfg.dask.threads_per_worker = 1, 1
    with run.dask_client(cfg, "local") as client:
        scheduler = client.cluster.scheduler
        assert scheduler.http_server.port != 8787
        assert client.submit(sum, [1, 2]).result() == 3


def test_a_scatter_on_a_cluster_with_no_worker_left_waits_for_one_then_says_so(monkeypatch, caplog):
    """progress.scatter (every task's data goes through it): with every worker gone, a worker that
    joins within progress.WORKER_WAIT_S takes the data and the run goes on; none joining is
    NoWorkers, whose message says what happened (Dask's own error was a TimeoutError, "No valid
    workers found", after a few seconds, which failed the run with a traceback)."""
    import threading
    import time

    from distributed import Client, LocalCluster

    from pipeline import progress
    monkeypatch.setattr(progress, "WORKER_WAIT_S", 60.0)
    with LocalCluster(n_workers=0, threads_per_worker=1, processes=False, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        # (the scheduler's own wait for a worker cut to 0.5 s: the worker joins after it gave up)
        joins = threading.Timer(2.0, cluster.scale, [1])
        joins.start()
        [future] = progress.scatter(client, [{"rows": 3}], hash=False, timeout=0.5)
        joins.join()
        assert future.result() == {"rows": 3}
        assert "no worker is left on the Dask cluster: waiting up to 60 s" in caplog.text
        del future
        cluster.scale(0)
        while client.scheduler_info()["workers"]:
            time.sleep(0.1)
        monkeypatch.setattr(progress, "WORKER_WAIT_S", 1.0)
        with pytest.raises(progress.NoWorkers, match="every worker left the Dask cluster at .* none came back "
                                                     "within 1 s"):
            progress.scatter(client, [{"rows": 3}], hash=False, timeout=0.5)
