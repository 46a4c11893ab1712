"""What an operator relies on around a run: signals, the OUT lock, leftovers of killed runs,
progress in a batch log, the dashboard, presets and the help text."""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from pipeline import catalog, outdir
from pipeline.cli import main
from pipeline.config import Config, ConfigError, load_config, preset_names
from pipeline.progress import Progress, map_tasks

REPO = Path(__file__).resolve().parent.parent


def _tree(folder: Path) -> dict[str, str]:
    """sha256 of every file, apart from the run locks' holder records (they name the latest run)
    and the catalog (the next run's state, not an output: it commits just before the outputs are
    written, so a failed write leaves the newer catalog; tests/test_catalog.py covers it)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name not in (outdir.LOCK_NAME, catalog.LOCK_NAME)
            and p.relative_to(folder).parts[0] != "catalog"}


@pytest.fixture(scope="module")
def photo_set(photo_paths, tmp_path_factory) -> Path:
    """160 real photos and a resized, re-encoded copy of each: enough ORB work that a signal sent
    when the verify tier starts arrives while it runs."""
    root = tmp_path_factory.mktemp("operator-photos")
    for p in photo_paths[:160]:
        img = Image.open(p).convert("RGB")
        img.save(root / f"{p.stem}.jpg", quality=92)
        img.resize((img.width * 3 // 4, img.height * 3 // 4)).save(root / f"{p.stem}_small.jpg", quality=70)
    return root


@pytest.mark.slow
@pytest.mark.reliability
def test_sigterm_mid_verify_exits_1_and_leaves_the_previous_outputs(photo_set, tmp_path):
    out = tmp_path / "out"
    assert main(["dedupe", str(photo_set), "--out", str(out), "--tiers", "screen", "--scheduler", "sync",
                 "--quiet"]) == 0
    before = _tree(out)
    inputs = _tree(photo_set)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "dedupe", str(photo_set), "--out", str(out),
                             "--log-level", "INFO"], stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    lines = []
    try:
        for line in proc.stderr:  # the log, line by line, until the verify tier starts
            lines.append(line)
            if "features: started" in line:
                proc.send_signal(signal.SIGTERM)
                break
        else:
            pytest.fail("the run ended before its verify tier started:\n" + "".join(lines))
        rest = proc.stderr.read()
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rc == 1, rest
    assert "stopped by SIGTERM" in rest
    assert "verify: finished" not in rest  # it really was stopped mid-verify
    assert _tree(out) == before  # byte-identical previous outputs
    assert not [n for n in os.listdir(out) if n.startswith(outdir.WORK_PREFIX) or n.endswith(".tmp")]
    assert _tree(photo_set) == inputs


@pytest.mark.reliability
def test_next_run_removes_what_killed_runs_left(tmp_path):
    data = tmp_path / "d"
    data.mkdir()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(data / "a.png")
    out = tmp_path / "out"
    (out / "_work-99999" / "orb").mkdir(parents=True)  # as a kill -9 leaves them
    (out / "_work-99999" / "orb" / "part-000000.parquet").write_bytes(b"x")
    (out / "_work-99999" / outdir.WORK_MARK).write_text("99999 host\n")  # (each run marks its own)
    # (and one a cluster's workers made again after its run removed it: no mark, a tier's folders only)
    (out / "_work-99998" / "embed").mkdir(parents=True)
    (out / ".pairs.parquet.0123abcd.tmp").write_bytes(b"half a file")
    (out / ".dedupe" / "tmp-20260101T000000Z-deadbeef").mkdir(parents=True)  # killed mid-write
    assert main(["dedupe", str(data), "--out", str(out), "--tiers", "screen", "--scheduler", "sync", "--quiet"]) == 0
    assert sorted(os.listdir(out)) == [".dedupe", ".dedupe.lock", "catalog", "images.parquet", "pairs.parquet",
                                       "report", "report.html", "run.json"]
    assert [p.name for p in (out / ".dedupe").iterdir() if not p.name.startswith("gen-")] == ["current"]


@pytest.mark.reliability
def test_a_run_leaves_what_it_did_not_make_in_out_alone(tmp_path, capsys):
    """An OUT given to a run may hold the user's own files: a folder `report/` (publishing
    replaced it with its link, removing the photos in it), a `_work-2019` folder and a `.notes.tmp`
    (both removed as a killed run's leftovers)."""
    data = tmp_path / "d"
    data.mkdir()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(data / "a.png")
    out = tmp_path / "out"
    (out / "report").mkdir(parents=True)
    (out / "report" / "mine.png").write_bytes((data / "a.png").read_bytes())
    args = ["dedupe", str(data), "--out", str(out), "--tiers", "screen", "--scheduler", "sync", "--quiet"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "already holds report" in err and "nothing was changed" in err and len(err.strip().splitlines()) == 1
    assert (out / "report" / "mine.png").is_file() and sorted(p.name for p in out.iterdir()) == ["report"]
    (out / "run.json").write_text("{}")  # (a file of that name, not a run's)
    (out / "report" / "mine.png").rename(out / "mine.png")
    (out / "report").rmdir()
    assert main(args) == 2 and "already holds run.json" in capsys.readouterr().err
    (out / "run.json").unlink()
    (out / "catalog" / "features").mkdir(parents=True)  # (the default catalog's folder, the user's)
    (out / "catalog" / "features" / "x.txt").write_text("mine")
    assert main(args) == 2 and "holds files but no catalog" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["catalog", "mine.png"]
    (out / "catalog" / "features" / "x.txt").rename(out / "x.txt")
    (out / "catalog" / "features").rmdir()
    (out / "_work-2020").mkdir()  # (empty: no run's either)
    (out / "_work-2019").mkdir()
    (out / "_work-2019" / "x.png").write_bytes(b"mine")
    (out / ".notes.tmp").write_text("mine")
    assert main(args) == 0
    assert (out / "_work-2019" / "x.png").read_bytes() == b"mine" and (out / ".notes.tmp").read_text() == "mine"
    assert (out / "mine.png").is_file()
    assert main(args) == 0  # (a previous run's OUT: its own links are replaced)
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "_work-2019", "_work-2020", "catalog", "images.parquet", "mine.png", "pairs.parquet", "report", "report.html",
        "run.json", "x.txt"]


@pytest.mark.reliability
def test_a_second_run_into_the_same_out_exits_2_naming_the_holder(tmp_path, capsys):
    data = tmp_path / "d"
    data.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    with outdir.locked(out):
        rc = main(["dedupe", str(data), "--out", str(out), "--tiers", "screen", "--scheduler", "sync", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2
    assert f"pid {os.getpid()}" in err and "in use" in err and "another --out" in err
    # released: the next run goes through
    assert main(["dedupe", str(data), "--out", str(out), "--tiers", "screen", "--scheduler", "sync", "--quiet"]) == 0


def test_unwritable_out_is_a_usage_error(tmp_path, capsys):
    (tmp_path / "d").mkdir()
    (tmp_path / "file").write_text("x")
    rc = main(["dedupe", str(tmp_path / "d"), "--out", str(tmp_path / "file" / "out"), "--tiers", "screen",
               "--scheduler", "sync", "--quiet"])
    assert rc == 2 and "choose another --out" in capsys.readouterr().err


def test_batch_log_has_stage_lines_and_a_heartbeat(caplog):
    progress = Progress(quiet=False, heartbeat_s=0.05, stream=open(os.devnull, "w"))  # not a terminal
    caplog.set_level(logging.INFO, logger="pipeline")
    with progress.stage("verify", total=4, unit="pair") as tracker:
        results = map_tasks(None, lambda task, k: (time.sleep(0.08), task * k)[1], [1, 2, 3, 4], 10,
                            tracker=tracker)
    assert results == [10, 20, 30, 40]
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0] == "verify: started (4 pair)"
    assert messages[-1].startswith("verify: finished 4 pair in")
    beats = [m for m in messages if m.startswith("verify: ") and "pair/s" in m]
    assert beats, messages  # heartbeat lines while it ran: done/total, rate
    assert any("/4 pair" in b and "%" in b for b in beats)
    assert any("ETA" in b for b in beats)


def test_log_lines_on_a_terminal_go_above_the_bar_not_into_it(monkeypatch):
    """On a terminal a stage's tqdm bar holds the last line: a log line written while it was shown
    ran on from the bar's text ("...img/s]2026-12-07 ... INFO ...")."""
    import io

    class Terminal(io.StringIO):
        def isatty(self):
            return True
    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    handler = logging.StreamHandler(sys.stderr)  # (as logging.basicConfig sets it up in the CLI)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        with Progress(quiet=False, stream=term).stage("screen", total=4, unit="img") as tracker:
            tracker.update(2)
            logging.getLogger("pipeline").warning("a line written while the bar is shown")
            tracker.update(2)
    finally:
        root.removeHandler(handler)
    text = term.getvalue()
    at = text.index("a line written while the bar is shown")
    assert text[at - 1] in "\r\n", repr(text[max(0, at - 80):at + 40])
    assert "img" in text  # (the bar was drawn)
    assert not any(type(h).__name__ == "_TqdmLoggingHandler" for h in root.handlers)


def _times(task, k):
    return task * k


def _pair_times(a, b, k):
    return a * b * k


def test_tasks_sent_to_a_cluster_a_few_at_a_time_keep_their_order_and_counts(monkeypatch):
    """map_tasks scatters its tasks' data SCATTER_TASKS at a time (not all in one message): the
    results still come back in task order, plain and star, and the tracker counts every task."""
    import distributed

    from pipeline import progress
    monkeypatch.setattr(progress, "SCATTER_TASKS", 3)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster, distributed.Client(cluster) as client:
        with Progress(quiet=True).stage("verify", total=10, unit="pair") as tracker:
            assert map_tasks(client, _times, list(range(10)), 10, tracker=tracker) == [10 * t for t in range(10)]
        assert tracker.done == 10
        tasks = [(a, a + 1) for a in range(7)]
        assert map_tasks(client, _pair_times, tasks, 2, star=True) == [a * (a + 1) * 2 for a in range(7)]
        assert map_tasks(client, _times, [], 2) == []


class _MadeWhenIndexed:
    """n tasks (their numbers), each made when indexed: records the most made and not yet
    handed back (`finished`, called from map_tasks' `each`) at any time."""

    def __init__(self, n: int):
        self.n, self.made, self.finished, self.most = n, [], 0, 0

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if not 0 <= i < self.n:
            raise IndexError(i)
        self.made.append(i)
        self.most = max(self.most, len(self.made) - self.finished)
        return i

    def done(self, number, result):
        assert result == 10 * number
        self.finished += 1


def test_tasks_in_flight_are_made_as_they_are_sent(monkeypatch):
    """map_tasks(in_flight=k) takes each task from its sequence only when it sends it, and has
    at most k made and unfinished at a time: on a cluster (sent a scatter's worth at a time), on
    the in-process pool and one by one. Every task runs once and the tracker counts them all."""
    import distributed

    from pipeline import progress
    from pipeline.progress import in_process_threads
    monkeypatch.setattr(progress, "SCATTER_TASKS", 2)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster, distributed.Client(cluster) as client:
        for where, k in ((client, 5), (client, 1), (None, 3), (None, 1)):
            with (in_process_threads(2) if where is None and k > 1 else contextlib.nullcontext()), \
                    Progress(quiet=True).stage("verify", total=23, unit="pair") as tracker:
                tasks = _MadeWhenIndexed(23)
                assert map_tasks(where, _times, tasks, 10, tracker=tracker, each=tasks.done, in_flight=k) == []
            assert sorted(tasks.made) == list(range(23)) and tasks.finished == 23 and tracker.done == 23
            assert 1 <= tasks.most <= k, (where, k, tasks.most)
            if where is not None and k > 2:
                assert tasks.most > 2  # (kept topped up, not one at a time)


def test_quiet_has_no_heartbeat(caplog):
    caplog.set_level(logging.INFO, logger="pipeline")
    with Progress(quiet=True, heartbeat_s=0.01).stage("screen", total=1, unit="img") as tracker:
        time.sleep(0.05)
        tracker.update(1)
    assert [r.getMessage().split(" in ")[0] for r in caplog.records] == ["screen: started (1 img)",
                                                                         "screen: finished 1 img"]


@pytest.mark.slow
def test_local_cluster_dashboard_is_served_with_bokeh(caplog):
    from pipeline.run import dask_client
    cfg = Config()
    cfg.dask.n_workers = 1
    cfg.dask.dashboard_address = "127.0.0.1:0"
    caplog.set_level(logging.INFO, logger="pipeline")
    with dask_client(cfg, "local") as client:
        link = client.dashboard_link
        body = urllib.request.urlopen(link, timeout=30).read().decode("utf-8", "replace")
    assert any(link in r.getMessage() for r in caplog.records)  # logged at INFO
    assert "needs bokeh" not in body.lower() and "<html" in body.lower()


def test_presets_load_and_differ_where_they_say():
    assert preset_names() == ["default", "fast", "high-recall", "strict"]
    assert load_config(preset="default") == Config()
    assert load_config(preset="fast").tiers == "verify"
    assert load_config(preset="high-recall").screen.mode == "hash+embedding"
    strict = load_config(preset="strict")
    assert strict.decide.cosine_threshold > Config().decide.cosine_threshold
    assert strict.decide.accept_inliers > Config().decide.accept_inliers
    # --set still wins over a preset
    assert load_config(None, ["screen.mode=hash"], preset="high-recall").screen.mode == "hash"
    with pytest.raises(ConfigError, match="unknown preset"):
        load_config(preset="turbo")


def test_help_has_examples_outputs_and_exit_codes():
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("DEDUPE_PROG", None)
    result = subprocess.run([sys.executable, "-m", "pipeline", "dedupe", "--help"], capture_output=True,
                            text=True, env=env, cwd=REPO, timeout=60)
    assert result.returncode == 0
    text = result.stdout
    assert "python -m pipeline dedupe photos/ --out out --preset high-recall" in text  # the command used
    for needle in ("exit codes:", "pairs.parquet", "images.parquet", "run.json", "SIGTERM", "--preset"):
        assert needle in text, needle


def _screen_run(data: Path, out: Path) -> int:
    return main(["dedupe", str(data), "--out", str(out), "--tiers", "screen", "--scheduler", "sync", "--quiet"])


def test_outputs_are_one_generation_and_run_json_lists_their_sha256(tmp_path):
    data = tmp_path / "d"
    data.mkdir()
    for i in range(3):
        Image.new("RGB", (64, 64), (80 * i, 20, 200)).save(data / f"{i}.png")
    out = tmp_path / "out"
    assert _screen_run(data, out) == 0
    first = (out / "run.json").resolve().parent
    assert _screen_run(data, out) == 0
    second = (out / "run.json").resolve().parent
    assert first != second and first.exists()  # the previous generation is kept, one back
    for name in outdir.PUBLISHED:
        assert (out / name).is_symlink() and (out / name).resolve().parent == second
    import json
    manifest = json.loads((out / "run.json").read_text())
    assert second.name == f"gen-{manifest['run_id']}"
    assert manifest["files"] == {n: hashlib.sha256((second / n).read_bytes()).hexdigest()
                                 for n in ("images.parquet", "pairs.parquet", "report.html")}
    assert _screen_run(data, out) == 0
    assert not first.exists()  # two back: removed


@pytest.mark.reliability
def test_a_failure_while_writing_leaves_the_previous_set_whole(tmp_path, monkeypatch):
    data = tmp_path / "d"
    data.mkdir()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(data / "a.png")
    out = tmp_path / "out"
    assert _screen_run(data, out) == 0
    before = _tree(out)
    from pipeline import write

    def disk_full(real):
        def write_or_fail(frame, schema, path, *args, **kwargs):
            if path.name == "pairs.parquet":  # images.parquet is already written by then
                raise OSError(28, "No space left on device")
            return real(frame, schema, path, *args, **kwargs)
        return write_or_fail

    for name in ("write_table", "write_table_parts"):  # (a run writes pairs.parquet in parts)
        monkeypatch.setattr(write, name, disk_full(getattr(write, name)))
    Image.new("RGB", (64, 64), (200, 2, 3)).save(data / "b.png")
    assert _screen_run(data, out) == 1
    assert _tree(out) == before
    assert not list((out / ".dedupe").glob("tmp-*"))


def test_the_driver_hands_freed_heap_back_to_the_os():
    """run.release_freed_memory (called between the driver's stages) gives the C heap's freed
    pages back: in a fresh process, 200 MB of 4 kB allocations, every 64th kept so the heap's top
    cannot shrink, stay in the RSS when the rest are freed, and leave it after the call. Skipped
    where the C library is not glibc (no malloc_trim: the call returns False there)."""
    import platform
    if platform.libc_ver()[0] != "glibc":
        pytest.skip("malloc_trim is glibc's; this C library is " + (platform.libc_ver()[0] or "unknown"))
    script = ("import json\nfrom pipeline.run import release_freed_memory\n"
              "def rss():\n    return next(int(l.split()[1]) >> 10 for l in open('/proc/self/status') if l.startswith('VmRSS'))\n"
              "blocks = [bytes(4000) + bytes([i % 256]) for i in range(50_000)]\n"
              "kept = blocks[::64]\nfull = rss()\ndel blocks\nfreed = rss()\n"
              "ok = release_freed_memory()\nprint(json.dumps({'full': full, 'freed': freed, 'trimmed': rss(), 'ok': ok}))\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    mb = json.loads(proc.stdout.strip().splitlines()[-1])
    assert mb["ok"]
    assert mb["freed"] > mb["full"] - 50, mb  # freed, but still held by the heap
    assert mb["freed"] - mb["trimmed"] > 120, mb  # most of the 200 MB handed back


def test_the_tiers_read_the_screens_frame_itself_not_a_copy():
    """run.by_row: the screen's frame, already indexed by row number, is passed to the tiers as it
    is (a copy of every image's row was held to the end of a run); a frame with another index is
    re-indexed by row, its rows unchanged."""
    import pandas as pd

    from pipeline.run import by_row
    images = pd.DataFrame({"abs_path": ["/a.jpg", "/b.jpg", "/c.jpg"], "error": [None, "x", None]})
    assert by_row(images) is images
    other = images.set_index(pd.Index([7, 3, 5]))
    rows = by_row(other)
    assert rows.index.tolist() == [0, 1, 2]
    assert rows["abs_path"].tolist() == ["/a.jpg", "/b.jpg", "/c.jpg"]
    assert other.index.tolist() == [7, 3, 5]  # (the caller's frame is left as it was)


def test_the_cli_driver_allocates_arrow_memory_from_jemalloc_unless_told_otherwise(monkeypatch):
    """The CLI's process takes Arrow's memory from jemalloc (it gives freed pages back; Arrow's
    default mimalloc keeps them, measured in docs/benchmarks.md), unless ARROW_DEFAULT_MEMORY_POOL
    names a pool; a pyarrow without jemalloc keeps its default."""
    import pyarrow as pa
    from pipeline.cli import driver_arrow_pool
    before = pa.default_memory_pool()
    try:
        pa.set_memory_pool(pa.system_memory_pool())
        monkeypatch.setenv("ARROW_DEFAULT_MEMORY_POOL", "system")
        assert driver_arrow_pool() == "system"  # the operator's choice stands
        monkeypatch.delenv("ARROW_DEFAULT_MEMORY_POOL")
        expected = "jemalloc" if "jemalloc" in pa.supported_memory_backends() else "system"
        assert driver_arrow_pool() == expected
        assert pa.array(["a", "b"]).to_pandas().tolist() == ["a", "b"]  # the pool in use works
        monkeypatch.setattr(pa, "jemalloc_memory_pool", lambda: (_ for _ in ()).throw(NotImplementedError("no")))
        pa.set_memory_pool(pa.system_memory_pool())
        assert driver_arrow_pool() == "system"  # built without jemalloc: the pool is left alone
    finally:
        pa.set_memory_pool(before)
