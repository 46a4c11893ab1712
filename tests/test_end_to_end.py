"""The CLI as a user runs it: outputs per the contract, exit codes, bad input, Dask schedulers."""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from bench.cluster import KillOnce, Worker, external_cluster, free_port
from pipeline.cli import main

REPO = Path(__file__).resolve().parent.parent
PAIR_COLUMNS = ["path_a", "path_b", "image_id_a", "image_id_b", "hash_distance", "orb_matches", "orb_inliers",
                "orb_score", "cosine", "stage", "is_duplicate", "reason", "rule", "ssim", "hist_corr"]
IMAGE_COLUMNS = ["image_id", "path", "bytes", "mtime", "width", "height", "format", "sha256", "hash", "error",
                 "cluster_id", "raw_path"]


def cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=600)


@pytest.fixture(scope="module")
def screen_run(labelled_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("screen-run")
    data = labelled_dir / "imagededup_tests"
    result = cli("dedupe", str(data), "--out", str(out), "--tiers", "screen", "--scheduler", "sync", "--quiet")
    assert result.returncode == 0, result.stderr
    return out


def test_outputs_follow_the_contract(screen_run):
    images = pd.read_parquet(screen_run / "images.parquet")
    pairs = pd.read_parquet(screen_run / "pairs.parquet")
    assert list(images.columns) == IMAGE_COLUMNS and list(pairs.columns) == PAIR_COLUMNS
    assert (screen_run / "run.json").is_file() and (screen_run / "report.html").is_file()
    assert str(images["mtime"].dtype).startswith("datetime64") and images["image_id"].dtype == "int64"
    assert pairs["is_duplicate"].dtype == bool and pairs["hash_distance"].dtype == "int16"
    assert len(images) == 34 and images["image_id"].is_unique
    assert (pairs["path_a"] < pairs["path_b"]).all()
    assert set(pairs["stage"]) <= {"exact", "screen"}
    assert pairs["orb_inliers"].isna().all() and pairs["cosine"].isna().all()  # tiers not run
    leftovers = [n for n in os.listdir(screen_run) if n.startswith(".") or n.startswith("_work")]
    assert sorted(leftovers) == [".dedupe", ".dedupe.lock"]  # generations + the run lock; no temp files


def test_corrupt_file_is_a_row_with_its_error(screen_run):
    images = pd.read_parquet(screen_run / "images.parquet").set_index("path")
    for name in ("tests/data/mixed_images/ukbench09268_corrupt.jpg",
                 "tests/data/mixed_nested_images/ukbench09268_corrupt.jpg"):
        assert images.loc[name, "error"]
        assert pd.isna(images.loc[name, "cluster_id"])


def test_format_variants_are_found(screen_run):
    pairs = pd.read_parquet(screen_run / "pairs.parquet")
    variants = {f"tests/data/formats_images/ukbench09380.{ext}" for ext in ("bmp", "jpeg", "png", "svg", "webp")}
    variants.add("tests/data/base_images/ukbench09380.jpg")
    found = pairs[pairs["path_a"].isin(variants) & pairs["path_b"].isin(variants) & pairs["is_duplicate"]]
    # all six files end up connected, and the re-encoded WebP is a near (not exact) pair
    images = pd.read_parquet(screen_run / "images.parquet").set_index("path")
    assert images.loc[sorted(variants), "cluster_id"].nunique() == 1
    assert images.loc[sorted(variants), "cluster_id"].notna().all()
    webp = found[(found["path_a"].str.endswith(".webp")) | (found["path_b"].str.endswith(".webp"))]
    assert (webp["stage"] == "screen").any()


def test_bad_usage_exits_2_with_a_clear_message(tmp_path):
    missing = cli("dedupe", str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    bad_key = cli("dedupe", str(tmp_path), "--set", "screen.max_distanse=3")
    assert bad_key.returncode == 2 and "unknown config key 'screen.max_distanse'" in bad_key.stderr
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("screen: {max_distance: [1, 2\n")
    bad_cfg = cli("dedupe", str(tmp_path), "--config", str(cfg))
    assert bad_cfg.returncode == 2 and "is not valid YAML" in bad_cfg.stderr
    no_args = cli("dedupe")
    assert no_args.returncode == 2
    for given in (["--catalog", str(tmp_path / "c")], ["--set", f"catalog={tmp_path / 'c'}"]):
        both = cli("dedupe", str(tmp_path), "--out", str(tmp_path / "o"), *given, "--no-catalog")
        assert both.returncode == 2 and "contradict each other" in both.stderr  # (--set's was dropped)
    assert not (tmp_path / "o").exists()


def test_library_chatter_is_held_to_warnings(tmp_path):
    """Libraries that log at INFO what is no news to this tool's user are held to WARNING (at any
    level but DEBUG): the Azure SDK each request, FAISS's loader each CPU build it tries, 8 lines
    per high-recall run ("Could not load library ... ModuleNotFoundError") that read like a failure."""
    for name in ("azure", "faiss"):
        logging.getLogger(name).setLevel(logging.NOTSET)
    assert main(["dedupe", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert logging.getLogger("azure").level == logging.getLogger("faiss").level == logging.WARNING


def test_a_full_disk_is_one_line_and_exit_1(tmp_path, monkeypatch, caplog):
    """No space left on the device (a full OUT or work_dir disk): exit 1 with one line saying what
    to do, not a 30-line traceback; nothing is published."""
    import errno
    import logging
    from pipeline import run as run_module

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "o" / "images.parquet"))
    monkeypatch.setattr(run_module, "_cascade", full)
    (tmp_path / "d").mkdir()
    with caplog.at_level(logging.ERROR, logger="pipeline"):
        assert main(["dedupe", str(tmp_path / "d"), "--out", str(tmp_path / "o"), "--tiers", "screen",
                     "--scheduler", "sync", "--quiet"]) == 1
    assert "no space left on the device" in caplog.text and "Traceback" not in caplog.text
    assert all(r.exc_info is None for r in caplog.records)
    assert not (tmp_path / "o" / "run.json").exists()


def test_empty_folder_and_bad_files_complete(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    assert main(["dedupe", str(data), "--out", str(tmp_path / "o1"), "--tiers", "screen", "--scheduler", "sync",
                 "--quiet"]) == 0
    assert len(pd.read_parquet(tmp_path / "o1" / "images.parquet")) == 0
    (data / "empty.jpg").write_bytes(b"")
    (data / "text.png").write_text("not a png")
    Image.new("RGB", (64, 64), (9, 9, 9)).save(data / "ok.png")
    (data / "trunc.jpg").write_bytes((data / "ok.png").read_bytes()[:40])
    before = {p.name: p.read_bytes() for p in data.iterdir()}
    assert main(["dedupe", str(data), "--out", str(tmp_path / "o2"), "--tiers", "screen", "--scheduler", "sync",
                 "--quiet"]) == 0
    images = pd.read_parquet(tmp_path / "o2" / "images.parquet").set_index("path")
    assert images.loc["empty.jpg", "error"] == "empty file"
    assert images.loc["text.png", "error"] and images.loc["trunc.jpg", "error"]
    assert pd.isna(images.loc["ok.png", "error"])
    assert before == {p.name: p.read_bytes() for p in data.iterdir()}  # inputs untouched


def test_out_and_catalog_inside_data_are_not_scanned(photo_paths, tmp_path):
    """A nightly job with OUT (and a catalog) inside DATA: each run would otherwise scan the last
    run's report thumbnails as new images, and find more "duplicates" every night."""
    data = tmp_path / "data"
    data.mkdir()
    for i, src in enumerate(photo_paths[:6]):
        (data / f"p{i}{src.suffix.lower()}").write_bytes(src.read_bytes())
    (data / "copy.jpg").write_bytes((data / f"p0{photo_paths[0].suffix.lower()}").read_bytes())
    args = ["--tiers", "verify", "--scheduler", "sync", "--quiet"]
    runs = []
    for n in range(2):
        assert main(["dedupe", str(data), "--out", str(data / "out"), "--catalog", str(data / "catalog"), *args]) == 0
        runs.append(_frames(data / "out"))
        assert list((data / "out" / "report" / "thumbs").iterdir())  # (there is something to skip)
    for images, pairs in runs:
        assert sorted(images["path"]) == sorted(p.name for p in data.iterdir() if p.is_file())
        assert len(pairs[pairs["is_duplicate"]]) == 1
    # a symlink into OUT is the same folder
    (data / "link").symlink_to(data / "out", target_is_directory=True)
    assert main(["dedupe", str(data), "--out", str(data / "out"), "--catalog", str(data / "catalog"), *args]) == 0
    assert sorted(_frames(data / "out")[0]["path"]) == sorted(runs[0][0]["path"])
    # ... also when OUT lies outside DATA and only a symlink leads there
    (data / "link").unlink()
    for folder in ("out", "catalog"):
        shutil.rmtree(data / folder)
    elsewhere = tmp_path / "elsewhere"
    (data / "to-out").symlink_to(elsewhere, target_is_directory=True)
    for _ in range(2):
        assert main(["dedupe", str(data), "--out", str(elsewhere), *args]) == 0
    assert sorted(_frames(elsewhere)[0]["path"]) == sorted(runs[0][0]["path"])
    # ... and another run's OUT and catalog inside DATA (a second job over the same photos): its
    # report's thumbnails were scanned as images and paired with their originals
    assert main(["dedupe", str(data), "--out", str(data / "other-out"), "--catalog", str(data / "other-cat"),
                 *args]) == 0
    assert list((data / "other-out" / "report" / "thumbs").iterdir())
    assert main(["dedupe", str(data), "--out", str(elsewhere), "--no-catalog", *args]) == 0
    assert sorted(_frames(elsewhere)[0]["path"]) == sorted(runs[0][0]["path"])
    for folder in ("other-out", "other-cat"):
        shutil.rmtree(data / folder)
    # OUT = DATA itself: refused, saying what to do (its outputs would be scanned as images)
    before = sorted(p.name for p in data.iterdir())
    assert main(["dedupe", str(data), "--out", str(data) + "/", *args]) == 2
    assert sorted(p.name for p in data.iterdir()) == before
    # an empty DATA or --out (`make dedupe OUT=`: the current folder), the catalog in DATA itself,
    # a work_dir that cannot be written: refused at once, nothing written
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    for extra in (["--out", ""], ["--out", str(tmp_path / "o4"), "--catalog", str(data)],
                  ["--out", str(tmp_path / "o5"), "--set", f"work_dir={blocker}/work"]):
        before = sorted(p.name for p in data.iterdir())
        assert main(["dedupe", str(data), *extra, *args]) == 2
        assert sorted(p.name for p in data.iterdir()) == before
    assert main(["dedupe", "", "--out", str(tmp_path / "o6"), *args]) == 2
    assert not (tmp_path / "o6").exists()
    # an OUT, catalog or work_dir whose path is not UTF-8: refused at once (the Parquet writer
    # takes UTF-8 paths only: the run failed at its end, with a traceback)
    odd = os.fsdecode(os.fsencode(str(tmp_path)) + b"/out-\xe9")
    for extra in (["--out", odd], ["--out", str(tmp_path / "o2"), "--catalog", odd],
                  ["--out", str(tmp_path / "o3"), "--set", f"work_dir={odd}"]):
        assert main(["dedupe", str(data), *extra, *args]) == 2
        assert not os.path.lexists(odd)


def _frames(out: Path):
    images = pd.read_parquet(out / "images.parquet").sort_values("path").reset_index(drop=True)
    pairs = pd.read_parquet(out / "pairs.parquet").sort_values(["path_a", "path_b"]).reset_index(drop=True)
    return images, pairs


@pytest.mark.slow
def test_real_dask_scheduler_and_worker_give_the_same_output(labelled_dir, models_dir, tmp_path):
    """A real `dask scheduler` + `dask worker` on 127.0.0.1: same Parquet content as local and sync."""
    data = labelled_dir / "threatexchange_pdq"
    keras_home = tmp_path / "keras"
    (keras_home / "models").mkdir(parents=True)
    for f in models_dir.glob("*.h5"):
        os.symlink(f, keras_home / "models" / f.name)
    env = dict(os.environ, KERAS_HOME=str(keras_home), PYTHONPATH=str(REPO))
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "workers").mkdir()
    with external_cluster(env, tmp_path / "scheduler", [Worker(tmp_path / "workers", nworkers=2)]) as (address, _):
        runs = {}
        for name, sched in (("remote", address), ("local", "local"), ("sync", "sync")):
            out = tmp_path / name
            result = subprocess.run([sys.executable, "-m", "pipeline", "dedupe", str(data), "--out", str(out),
                                     "--scheduler", sched, "--quiet"], capture_output=True, text=True, env=env,
                                    cwd=REPO, timeout=900)
            assert result.returncode == 0, result.stderr[-3000:]
            runs[name] = _frames(out)
        for name in ("local", "sync"):
            pd.testing.assert_frame_equal(runs["remote"][0], runs[name][0])
            pd.testing.assert_frame_equal(runs["remote"][1], runs[name][1])
        images, pairs = runs["remote"]
        assert pairs["cosine"].notna().any() and pairs["orb_inliers"].notna().any()
        # the acceptance of the confirm tier: the bridge's edits form one cluster with the original,
        # and none of the seven unrelated LabelMe photos is in any cluster
        images = images.set_index("path")
        orig = images.loc["pdq/data/bridge-mods/aaa-orig.jpg", "cluster_id"]
        assert pd.notna(orig)
        for edit in ("blur-a-little", "blur-a-lot", "high-contrast", "high-saturation", "sharpen-a-little",
                     "sharpen-a-lot", "shrink-a-little", "shrink-a-lot"):
            assert images.loc[f"pdq/data/bridge-mods/{edit}.jpg", "cluster_id"] == orig, edit
        labelme = images[images.index.str.contains("labelme-subset")]
        assert len(labelme) == 7 and labelme["cluster_id"].isna().all()

        # DATA, OUT, the catalog and work_dir given relative to the driver's folder: the workers, each
        # in its own folder, wrote the tiers' files relative to theirs (exit 1, their files left
        # there), and could not find DATA there (exit 2, "cannot use the input location")
        relative = subprocess.run([sys.executable, "-m", "pipeline", "dedupe", os.path.relpath(data, tmp_path),
                                   "--out", "rel-out",
                                   "--catalog", "rel-cat", "--set", "work_dir=rel-work", "--scheduler", address,
                                   "--tiers", "verify", "--quiet"],
                                  capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
        assert relative.returncode == 0, relative.stderr[-3000:]
        assert not any((tmp_path / "workers").rglob("*.parquet"))
        # a folder the workers do not see at the driver's path: refused before any work (exit 2; it
        # was a run of "cannot read" rows, exit 0, when it was DATA)
        from distributed import Client
        from pipeline import storage
        from pipeline.config import ConfigError
        with Client(address) as client:
            storage.check_workers(client, str(data))
            with pytest.raises(ConfigError, match="at the same paths as this process"):
                storage.check_workers(client, str(tmp_path / "seen by the driver only"))

        # a worker process killed (SIGKILL, as a machine lost) the first time it starts a task of
        # each stage, so the task's scattered data dies with it: the tasks are sent again, the
        # candidate search is made again, and the outputs are the same
        killed = tmp_path / "killed"
        killed.mkdir()
        stages = ("_screen_partition", "_build_shard", "_pair_block", "_features_task", "_verify_task",
                  "_embed_task", "make_thumbs", "thumbs_from_store")
        with Client(address) as client:
            client.register_plugin(KillOnce(stages, killed))
        try:
            result = subprocess.run([sys.executable, "-m", "pipeline", "dedupe", str(data), "--out",
                                     str(tmp_path / "killed-run"), "--scheduler", address, "--quiet"],
                                    capture_output=True, text=True, env=env, cwd=REPO, timeout=900)
        finally:
            with Client(address) as client:
                client.unregister_worker_plugin(KillOnce.name)
        assert result.returncode == 0, result.stderr[-3000:]
        died = {p.name.removeprefix("killed-") for p in killed.iterdir()}
        # each kill is its own loss: a task sent again, or the candidate search made again
        assert {"_screen_partition", "_build_shard", "_pair_block", "_features_task", "_verify_task"} <= died, died
        assert "sending it again" in result.stderr and "during the candidate search" in result.stderr
        again = _frames(tmp_path / "killed-run")
        pd.testing.assert_frame_equal(again[0], runs["sync"][0])
        pd.testing.assert_frame_equal(again[1], runs["sync"][1])


def test_missing_weights_stop_the_run_before_any_work(tmp_path):
    data = tmp_path / "d"
    data.mkdir()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(data / "a.png")
    env = dict(os.environ, PYTHONPATH=str(REPO), KERAS_HOME=str(tmp_path / "empty-keras"), DEDUPE_OFFLINE="1")
    result = subprocess.run([sys.executable, "-m", "pipeline", "dedupe", str(data), "--out", str(tmp_path / "o"),
                             "--quiet"], capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.5_224_no_top.h5" in result.stderr
    assert str(tmp_path / "empty-keras") in result.stderr  # says where to put it
    assert not (tmp_path / "o").exists()  # stopped at the check: no screen, no cluster, no output folder
    # another backbone whose weights are not here: the same clear stop, naming its file
    other = subprocess.run([sys.executable, "-m", "pipeline", "dedupe", str(data), "--out", str(tmp_path / "o"),
                            "--quiet", "--set", "embed.backbone=EfficientNetB0"], capture_output=True, text=True,
                           env=env, cwd=REPO, timeout=120)
    assert other.returncode == 2 and "efficientnetb0_notop.h5" in other.stderr
    assert not (tmp_path / "o").exists()


def test_a_cluster_whose_workers_all_leave_stops_the_run_with_a_clear_error(tmp_path, monkeypatch, caplog):
    """The only worker of a real cluster dies for good (its nanny too) at its first feature task:
    the run waits progress.WORKER_WAIT_S for a worker to join, then fails, exit 1, with one line
    saying what happened (it failed with Dask's 'No valid workers found' and a 50-line traceback)
    and nothing published."""
    from pipeline import progress
    data = tmp_path / "d"
    data.mkdir()
    base = Image.effect_mandelbrot((256, 256), (-2, -1.5, 1, 1.5), 100).convert("RGB")
    for i in range(4):  # near copies: candidate pairs, so the verify tier computes features
        base.resize((256 - 16 * i, 256 - 16 * i)).save(data / f"m{i}.jpg", quality=90 - 5 * i)
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "w").mkdir()
    (tmp_path / "killed").mkdir()
    monkeypatch.setattr(progress, "WORKER_WAIT_S", 3.0)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    with external_cluster(env, tmp_path / "scheduler", [Worker(tmp_path / "w")]) as (address, _):
        from distributed import Client
        with Client(address) as client:
            client.register_plugin(KillOnce(["_features_task"], tmp_path / "killed", for_good=True))
        code = main(["dedupe", str(data), "--out", str(tmp_path / "o"), "--tiers", "verify", "--no-catalog",
                     "--scheduler", address, "--quiet"])
    assert (tmp_path / "killed" / "killed-_features_task").exists()  # (the kill happened where meant)
    failed = [r for r in caplog.records if r.levelname == "ERROR"]
    assert code == 1, caplog.text[-3000:]
    assert len(failed) == 1 and "every worker left the Dask cluster" in failed[0].getMessage() \
        and "none came back within 3 s" in failed[0].getMessage(), caplog.text[-3000:]
    assert all(r.exc_info is None for r in caplog.records) and "No valid workers" not in caplog.text
    assert not (tmp_path / "o" / "pairs.parquet").exists() and not (tmp_path / "o" / "images.parquet").exists()


def test_unreachable_scheduler_is_a_usage_error(tmp_path):
    (tmp_path / "d").mkdir()
    result = cli("dedupe", str(tmp_path / "d"), "--out", str(tmp_path / "o"), "--tiers", "screen",
                 "--scheduler", f"tcp://127.0.0.1:{free_port()}")
    assert result.returncode == 2 and "cannot reach the Dask scheduler" in result.stderr
    no_port = cli("dedupe", str(tmp_path / "d"), "--out", str(tmp_path / "o"), "--tiers", "screen",
                  "--scheduler", "tcp://127.0.0.1")  # (a port left off: a malformed address)
    # (refused with the address's form: the client's attempt said "invalid literal for int()")
    assert no_port.returncode == 2 and "'tcp://127.0.0.1' is not 'auto', 'local', 'sync' or a Dask scheduler " \
        "address such as tcp://127.0.0.1:8786" in no_port.stderr, no_port.stderr
    assert "Traceback" not in no_port.stderr
    # a port that takes the connection and never answers (a scheduler's dashboard port, another
    # server): the client waited forever, with OUT locked
    import socket
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        mute = cli("dedupe", str(tmp_path / "d"), "--out", str(tmp_path / "o"), "--tiers", "screen",
                   "--scheduler", f"tcp://127.0.0.1:{silent.getsockname()[1]}")
    assert mute.returncode == 2 and "does not answer as a Dask scheduler" in mute.stderr, mute.stderr[-2000:]
    # a server that speaks first (SSH's banner): Dask read its bytes as a message length and failed
    # to allocate 2.82 EiB, a traceback and exit 1
    import threading
    with socket.socket() as talker:
        talker.bind(("127.0.0.1", 0))
        talker.listen(8)

        def banner():
            with contextlib.suppress(OSError):
                while True:
                    conn, _ = talker.accept()
                    conn.sendall(b"SSH-2.0-OpenSSH_8.9p1 Ubuntu-3ubuntu0.6\r\n")
        threading.Thread(target=banner, daemon=True).start()
        chatty = cli("dedupe", str(tmp_path / "d"), "--out", str(tmp_path / "o"), "--tiers", "screen",
                     "--scheduler", f"tcp://127.0.0.1:{talker.getsockname()[1]}")
    assert chatty.returncode == 2 and "does not answer as a Dask scheduler" in chatty.stderr, chatty.stderr[-2000:]
    assert not (tmp_path / "o").exists()


def test_a_scheduler_without_workers_is_a_usage_error(tmp_path, monkeypatch, capsys):
    """A real `dask scheduler` with no worker: the run waits progress.WORKER_WAIT_S for one, then
    exits 2 saying so (its first task's scatter failed after ~15 s with a 50-line traceback, exit 1)."""
    from pipeline import progress
    data = tmp_path / "d"
    data.mkdir()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(data / "a.png")
    (tmp_path / "scheduler").mkdir()
    monkeypatch.setattr(progress, "WORKER_WAIT_S", 2.0)
    with external_cluster(dict(os.environ, PYTHONPATH=str(REPO)), tmp_path / "scheduler", []) as (address, _):
        assert main(["dedupe", str(data), "--out", str(tmp_path / "o"), "--tiers", "screen", "--scheduler", address,
                     "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "has no workers (waited 2 s)" in err and "Traceback" not in err


def test_the_cli_module_runs_as_the_command_does(tmp_path):
    """`python -m pipeline.cli ...` (a cron line may call the module) did nothing and exited 0."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", "dedupe", str(tmp_path / "nope"), "--out",
                           str(tmp_path / "o")], capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert done.returncode == 2 and "does not exist" in done.stderr, done.stderr


def test_make_dedupe_without_data_says_its_usage_before_any_install():
    """`make dedupe` without DATA= ran the install (pip, minutes on a fresh checkout) and the
    weights' seeding before it said what was missing. (make -n: what make would run, in order.)"""
    if shutil.which("make") is None:
        pytest.skip("no make on this machine")
    # (--no-print-directory: under `make test` this make is a sub-make, which says where it is first)
    planned = subprocess.run(["make", "-n", "--no-print-directory", "dedupe", "DATA="], capture_output=True,
                             text=True, cwd=REPO, timeout=60).stdout.splitlines()
    assert planned and planned[0].startswith('test -n ""') and "usage: make dedupe DATA=" in planned[0], planned[:3]
