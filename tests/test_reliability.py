"""The reliability suite: every kind of bad input and the faults a scheduler brings.

One real run over a generated corpus of bad and odd files (tests/reliability_corpus.py) must exit 0
with the right row for each, leave the inputs untouched and write consistent outputs; each bad
configuration and environment must exit 2 with a message naming what to fix; and a run killed
(kill -9) in any stage, or stopped by SIGTERM, must leave the previous outputs whole, after which
the next run cleans up and succeeds. `make reliability` runs this file alone.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image, ImageFilter

from pipeline import outdir
from pipeline.cli import main
from tests.reliability_corpus import KINDS

pytestmark = pytest.mark.reliability
REPO = Path(__file__).resolve().parent.parent
MAX_FILE_BYTES = 1_000_000  # the corpus's "too large" file is above this


def _snapshot(root: Path) -> dict[bytes, tuple]:
    """Every entry under root (links not followed): mode, size, mtime_ns, sha256 of files. Read
    through folder fds (os.fwalk), so the corpus's path beyond PATH_MAX is covered too."""
    out = {}
    for dirpath, dirnames, filenames, dirfd in os.fwalk(os.fsencode(root)):
        for name in dirnames + filenames:
            st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
            digest = None
            if stat.S_ISREG(st.st_mode):
                fd = os.open(name, os.O_RDONLY, dir_fd=dirfd)
                with os.fdopen(fd, "rb") as fh:
                    digest = hashlib.sha256(fh.read()).hexdigest()
            out[os.path.join(dirpath, name)] = (st.st_mode, st.st_size, st.st_mtime_ns, digest)
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    expected: dict[bytes, tuple[str, str]] = {}
    for kind in KINDS:
        for rel, expect in kind.make(root):
            expected[rel] = (expect, kind.name)
    return root, expected


@pytest.fixture(scope="module")
def corpus_run(corpus, tmp_path_factory):
    root, expected = corpus
    before = _snapshot(root)
    out = tmp_path_factory.mktemp("corpus-out")
    rc = main(["dedupe", str(root), "--out", str(out), "--tiers", "verify", "--scheduler", "sync", "--quiet",
               "--set", f"scan.max_file_bytes={MAX_FILE_BYTES}"])
    return rc, out, before


def test_corpus_has_at_least_80_kinds():
    assert len(KINDS) >= 80, len(KINDS)
    assert len({k.name for k in KINDS}) == len(KINDS)


def test_bad_input_run_exits_0_with_the_right_row_for_each_kind(corpus, corpus_run):
    root, expected = corpus
    rc, out, _ = corpus_run
    assert rc == 0
    images = pd.read_parquet(out / "images.parquet")
    raw = [r if r is not None else p.encode("utf-8") for p, r in zip(images["path"], images["raw_path"])]
    rows = dict(zip(raw, images.itertuples()))
    problems = []
    for rel, (expect, kind) in expected.items():
        row = rows.get(rel)
        if expect == "skipped":
            if row is not None:
                problems.append(f"{kind}: {rel!r} should not be listed")
        elif row is None:
            problems.append(f"{kind}: {rel!r} has no row")
        elif expect == "ok" and not pd.isna(row.error):
            problems.append(f"{kind}: {rel!r} should decode, got error {row.error!r}")
        elif expect == "error" and (pd.isna(row.error) or not str(row.error).strip()):
            problems.append(f"{kind}: {rel!r} should be an error row with its reason")
    assert not problems, "\n".join(problems)
    # no row that the corpus did not make (nothing invented, nothing listed twice)
    listed = {rel for rel, (expect, _) in expected.items() if expect != "skipped"}
    assert set(raw) == listed
    assert images["image_id"].is_unique


def test_inputs_are_untouched(corpus, corpus_run):
    root, _ = corpus
    _, _, before = corpus_run
    assert _snapshot(root) == before


def test_outputs_are_consistent(corpus_run):
    _, out, _ = corpus_run
    images = pd.read_parquet(out / "images.parquet")
    pairs = pd.read_parquet(out / "pairs.parquet")
    ids = set(images["image_id"])
    assert set(pairs["image_id_a"]) <= ids and set(pairs["image_id_b"]) <= ids
    assert images.loc[images["error"].notna(), "cluster_id"].isna().all()  # broken files join no cluster
    assert images["cluster_id"].dropna().isin(images["image_id"]).all()
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["counts"]["files"] == len(images)
    assert manifest["counts"]["errors"] == int(images["error"].notna().sum())
    gen = (out / "run.json").resolve().parent
    for name, digest in manifest["files"].items():
        assert hashlib.sha256((gen / name).read_bytes()).hexdigest() == digest
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "<script>alert(1)</script>" not in html  # the hostile name is escaped


# ---------------------------------------------------------------------------------------------
# configuration and environment: exit 2 with a message that says what to fix

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


BAD_CONFIGS = [
    (["--set", "screen.max_distanse=3"], "unknown config key 'screen.max_distanse'"),
    (["--set", "screen.max_distance=lots"], "expected a whole number"),
    (["--set", "screen.max_distance=64"], "screen.max_distance must be in"),
    (["--set", "screen.hash=md5"], "is not one of"),
    (["--set", "screen.hash_size=5"], "multiple of 8"),
    (["--set", "tiers=everything"], "is not one of"),
    (["--set", "dask.memory_limit=lots"], "dask.memory_limit"),
    (["--set", "dask.n_workers=-1"], "dask.n_workers"),
    (["--set", "verify.scale_factor=1.0"], "verify.scale_factor"),
    (["--set", "verify.ratio=1.5"], "verify.ratio"),
    (["--set", "scan.max_file_bytes=-1"], "scan.max_file_bytes"),
    (["--set", "decide.cosine_threshold=2"], "cosine"),
    (["--set", "embed.batch_size=0"], "embed.batch_size"),
    (["--set", "novalue"], "expected key=value"),
    (["--scheduler", "foo://bar:1"], "not 'auto', 'local', 'sync' or a Dask scheduler address"),
    (["--preset", "turbo"], "invalid choice"),
]


@pytest.mark.parametrize("args, needle", BAD_CONFIGS, ids=[" ".join(a) for a, _ in BAD_CONFIGS])
def test_bad_configuration_exits_2_with_its_key(tmp_path, capsys, args, needle):
    (tmp_path / "d").mkdir()
    with pytest.raises(SystemExit) if args[0] == "--preset" else _no_raise():
        rc = main(["dedupe", str(tmp_path / "d"), "--out", str(tmp_path / "o"), "--tiers", "screen",
                   "--scheduler", "sync", *args])
        assert rc == 2
    assert needle in capsys.readouterr().err


class _no_raise:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _environments(tmp: Path) -> list[tuple[str, list[str], str]]:
    (tmp / "d").mkdir()
    Image.new("RGB", (32, 32)).save(tmp / "d" / "a.png")
    (tmp / "afile").write_text("x")
    (tmp / "bad.yaml").write_text("screen: [unclosed\n")
    (tmp / "list.yaml").write_text("- a\n- b\n")
    (tmp / "empty.yaml").write_text("")
    locked = tmp / "locked"
    locked.mkdir()
    return [
        ("missing DATA", [str(tmp / "nope"), "--out", str(tmp / "o1")], "does not exist"),
        ("DATA is a file", [str(tmp / "afile"), "--out", str(tmp / "o2")], "not a folder"),
        ("OUT is a file", [str(tmp / "d"), "--out", str(tmp / "afile")], "not a folder"),
        ("OUT's parent is a file", [str(tmp / "d"), "--out", str(tmp / "afile" / "o")], "choose another --out"),
        ("config file missing", [str(tmp / "d"), "--out", str(tmp / "o3"), "--config", str(tmp / "no.yaml")],
         "not found"),
        ("config not YAML", [str(tmp / "d"), "--out", str(tmp / "o4"), "--config", str(tmp / "bad.yaml")],
         "is not valid YAML"),
        ("config not a mapping", [str(tmp / "d"), "--out", str(tmp / "o5"), "--config", str(tmp / "list.yaml")],
         "expected a mapping"),
        ("scheduler not listening", [str(tmp / "d"), "--out", str(tmp / "o6"), "--scheduler",
                                     f"tcp://127.0.0.1:{_free_port()}"], "cannot reach the Dask scheduler"),
        # (the working files were written among the images, and kept there after the run)
        ("work_dir is DATA", [str(tmp / "d"), "--out", str(tmp / "o7"), "--set", f"work_dir={tmp / 'd'}"],
         "is DATA itself"),
        # (the local cluster failed to start: a ~60-line traceback once the screen had begun, exit 1)
        ("dashboard on no host of this machine", [str(tmp / "d"), "--out", str(tmp / "o8"), "--scheduler", "local",
                                                  "--set", "dask.dashboard_address=no.such.host.invalid:8787"],
         "cannot be served on this machine"),
        # (settled in silence before: the last --config, the flag over --set, '' meaning auto)
        ("two config files", [str(tmp / "d"), "--out", str(tmp / "o12"), "--config", str(tmp / "empty.yaml"),
                              "--config", str(tmp / "empty.yaml")], "--config is given 2 times"),
        ("--tiers and another --set tiers", [str(tmp / "d"), "--out", str(tmp / "o13"), "--set", "tiers=verify"],
         "--tiers screen and --set tiers=verify contradict each other"),
        ("--catalog and another --set catalog", [str(tmp / "d"), "--out", str(tmp / "o14"), "--catalog",
                                                 str(tmp / "c1"), "--set", f"catalog={tmp / 'c2'}"],
         "contradict each other"),
        ("an empty --scheduler", [str(tmp / "d"), "--out", str(tmp / "o15"), "--scheduler", ""],
         "--scheduler is empty"),
        ("the same, as the auto scheduler starts its cluster",
         [str(tmp / "d"), "--out", str(tmp / "o9"), "--set", "dask.dashboard_address=no.such.host.invalid:8787",
          "--set", "dask.auto_max_files=0"], "cannot be served on this machine"),
    ]


def test_bad_environments_exit_2_with_what_to_fix(tmp_path, capsys):
    failures = []
    for name, args, needle in _environments(tmp_path):
        rc = main(["dedupe", *args, "--tiers", "screen", "--quiet"])
        err = capsys.readouterr().err
        if rc != 2 or needle not in err:
            failures.append(f"{name}: rc={rc}, stderr={err[-300:]!r}")
        if name in ("scheduler not listening", "work_dir is DATA", "dashboard on no host of this machine") \
                and Path(args[2]).exists():  # (checked before OUT is made)
            failures.append(f"{name}: OUT was made")
    assert not failures, "\n".join(failures)
    # (an auto run that stays in-process starts no cluster: its dashboard setting is not refused)
    assert main(["dedupe", str(tmp_path / "d"), "--out", str(tmp_path / "o10"), "--tiers", "screen", "--quiet",
                 "--set", "dask.dashboard_address=no.such.host.invalid:8787"]) == 0


# ---------------------------------------------------------------------------------------------
# faults: kill -9 in each stage, SIGTERM; the previous outputs stay whole, the next run cleans up

@pytest.fixture(scope="module")
def fault_data(photo_paths, tmp_path_factory):
    root = tmp_path_factory.mktemp("fault-data")
    for p in photo_paths[:120]:
        img = Image.open(p).convert("RGB")
        img.save(root / f"{p.stem}.jpg", quality=90)
        img.crop((8, 8, img.width - 8, img.height - 8)).save(root / f"{p.stem}_crop.png")
    for p in photo_paths[120:150]:  # blurred copies: too few keypoints for ORB, so confirm embeds them
        img = Image.open(p).convert("RGB")
        img.save(root / f"{p.stem}.jpg", quality=90)
        img.filter(ImageFilter.GaussianBlur(6)).save(root / f"{p.stem}_blur.jpg", quality=90)
    return root


def _outputs(out: Path) -> dict[str, str]:
    return {name: hashlib.sha256((out / name).read_bytes()).hexdigest()
            for name in outdir.PUBLISHED if (out / name).is_file()}


def _is_complete_set(out: Path) -> bool:
    manifest = json.loads((out / "run.json").read_text())
    gen = (out / "run.json").resolve().parent
    return all(hashlib.sha256((gen / n).read_bytes()).hexdigest() == d for n, d in manifest["files"].items())


@pytest.mark.slow
@pytest.mark.parametrize("stage, sig", [("screen", signal.SIGKILL), ("features", signal.SIGKILL),
                                        ("embed", signal.SIGKILL), ("write", signal.SIGKILL),
                                        ("verify", signal.SIGTERM)])
def test_a_run_killed_in_any_stage_leaves_the_previous_outputs(fault_data, tmp_path, stage, sig):
    out = tmp_path / "out"
    assert main(["dedupe", str(fault_data), "--out", str(out), "--tiers", "screen", "--scheduler", "sync",
                 "--quiet"]) == 0
    before = _outputs(out)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "dedupe", str(fault_data), "--out", str(out),
                             "--scheduler", "sync", "--log-level", "INFO"],
                            stderr=subprocess.PIPE, text=True, env=env, cwd=REPO, start_new_session=True)
    seen = []
    try:
        for line in proc.stderr:
            seen.append(line)
            if f"{stage}: started" in line:
                os.killpg(proc.pid, sig)
                break
        else:
            pytest.fail(f"the run ended before its {stage} stage:\n" + "".join(seen[-20:]))
        proc.stderr.read()
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert rc == (-signal.SIGKILL if sig == signal.SIGKILL else 1)
    after = _outputs(out)
    # the old set, or (killed after the commit point of the write stage) the new one, whole
    assert after == before or (stage == "write" and _is_complete_set(out)), (before, after)
    # the next run cleans up what the killed one left and succeeds
    assert main(["dedupe", str(fault_data), "--out", str(out), "--tiers", "screen", "--scheduler", "sync",
                 "--quiet"]) == 0
    leftovers = [n for n in os.listdir(out) if n.startswith(outdir.WORK_PREFIX) or n.endswith(".tmp")]
    leftovers += [n for n in os.listdir(out / outdir.STATE_DIR) if n.startswith("tmp-") or n.endswith(".tmp")]
    assert not leftovers
    assert _is_complete_set(out)


def _blocked_signals(pid: int | str) -> int:
    """The signal mask (SigBlk) of a process's main thread, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigBlk:"):
            return int(line.split()[1], 16)
    raise AssertionError(f"no SigBlk line for {pid}")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads signal masks from /proc (Linux)")
def test_a_local_clusters_workers_never_see_ctrl_c_even_as_they_start():
    """The workers ignore SIGINT once their preload runs (`run.dask_setup`); before that, a Ctrl-C
    while they started printed two ~55-line tracebacks. They are spawned with SIGINT blocked
    (`run._sigint_blocked`), and the driver's own thread gets its mask back."""
    from pipeline.config import load_config
    from pipeline.run import dask_client
    sigint = 1 << (signal.SIGINT - 1)
    cfg = load_config(None, ["dask.n_workers=2", "dask.threads_per_worker=1", "dask.dashboard_address=none"])
    with dask_client(cfg, "local") as client:
        pids = list(client.run(os.getpid).values())
        assert len(pids) == 2
        for pid in pids:
            assert _blocked_signals(pid) & sigint, f"worker {pid} can be interrupted by a terminal's Ctrl-C"
        assert signal.SIGINT not in signal.pthread_sigmask(signal.SIG_BLOCK, [])  # (this thread's mask)
    assert signal.SIGINT not in signal.pthread_sigmask(signal.SIG_BLOCK, [])


@pytest.mark.slow
def test_ctrl_c_on_a_local_cluster_stops_quietly(fault_data, tmp_path):
    """Ctrl-C reaches the terminal's whole process group, the local cluster's workers too: the
    driver stops (exit 1, says so) and the workers, which leave SIGINT to it (`run.dask_setup`),
    print no KeyboardInterrupt tracebacks (each printed ~35 lines)."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    # (SIGINT as on a terminal: a shell starts background jobs with it ignored, and the tests may
    # run as one, e.g. `make test &`; Python then never turns it into KeyboardInterrupt)
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "dedupe", str(fault_data), "--out", str(tmp_path / "o"),
                             "--scheduler", "local", "--log-level", "INFO"],
                            stderr=subprocess.PIPE, text=True, env=env, cwd=REPO, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen = []
    try:
        for line in proc.stderr:
            seen.append(line)
            if "features: started" in line:
                time.sleep(1)  # (tasks running on the workers)
                os.killpg(proc.pid, signal.SIGINT)
                break
        else:
            pytest.fail("the run ended before its features stage:\n" + "".join(seen[-20:]))
        seen.append(proc.stderr.read())
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    err = "".join(seen)
    assert rc == 1 and "stopped by SIGINT" in err, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]


def test_a_signal_after_the_outputs_are_published_keeps_exit_0(photo_paths, tmp_path):
    """SIGTERM (or SIGINT) arriving once the outputs are committed, e.g. as the run logs "done":
    the run completed, so it exits 0 (it was killed with 143, and Airflow retried a run that had
    succeeded)."""
    data = tmp_path / "d"
    data.mkdir()
    for p in photo_paths[:3]:
        (data / p.name).write_bytes(p.read_bytes())
    code = ("import logging, os, signal, sys\n"
            "class Late(logging.Handler):\n"
            "    def emit(self, record):\n"
            "        if record.getMessage().startswith('done in'):\n"
            "            os.kill(os.getpid(), signal.SIGTERM)\n"
            "            os.kill(os.getpid(), signal.SIGINT)\n"
            "logging.getLogger('pipeline').addHandler(Late())\n"
            "from pipeline.cli import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-c", code, "dedupe", str(data), "--out", str(tmp_path / "o"), "--tiers",
                           "screen", "--scheduler", "sync", "--quiet"], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "o" / "run.json").is_file()


_LOST_SIGNAL = """
import gc, signal, sys
from pipeline import cli, write
real = write.write_outputs

def write_then_lose_a_signal(*args, **kwargs):
    real(*args, **kwargs)
    def collecting(phase, info):  # the handler's exception raised inside a GC callback: dropped
        if phase == "start":
            gc.callbacks.remove(collecting)
            cli._stop(signal.SIGTERM, None)
    gc.callbacks.append(collecting)
    gc.collect()
write.write_outputs = write_then_lose_a_signal
sys.exit(cli.main(sys.argv[1:]))
"""

_SIGNAL_AFTER_COMMIT = """
import os, signal, sys
from pipeline import cli, outdir
real = outdir.publish

def publish_then_signal(*args, **kwargs):
    gen = real(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGTERM)  # (before run() returns: a local cluster closing, ~2 s)
    os.kill(os.getpid(), signal.SIGINT)
    return gen
outdir.publish = publish_then_signal
sys.exit(cli.main(sys.argv[1:]))
"""


_SIGNAL_AT_COMMIT = """
import os, signal, sys
from pipeline import cli, outdir
real = outdir._replace_symlink

def switch_then_signal(link, target):
    real(link, target)
    if link.name == "current":  # the commit point itself: the new outputs are the current ones
        os.kill(os.getpid(), signal.SIGTERM)
outdir._replace_symlink = switch_then_signal
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("case", ["lost", "after_commit", "at_commit"])
def test_a_stop_signal_is_not_lost_and_one_after_the_commit_fails_nothing(photo_paths, tmp_path, case):
    """A SIGTERM whose exception was raised inside a garbage-collector callback (Dask's GC
    diagnosis, on a local cluster) was printed as "Exception ignored" and dropped, and the run went
    on to publish and exit 0, ignoring any further SIGTERM: it now stops at the publish, exit 1,
    nothing published. And a signal between the commit and the end of the run failed a run whose
    outputs were already the new ones (exit 1, "the previous outputs are untouched")."""
    data = tmp_path / "d"
    data.mkdir()
    for p in photo_paths[:3]:
        (data / p.name).write_bytes(p.read_bytes())
    code = {"lost": _LOST_SIGNAL, "after_commit": _SIGNAL_AFTER_COMMIT, "at_commit": _SIGNAL_AT_COMMIT}[case]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-c", code, "dedupe", str(data), "--out", str(tmp_path / "o"), "--tiers",
                           "screen", "--scheduler", "sync", "--quiet"], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=300)
    if case == "lost":
        assert done.returncode == 1 and "stopped by SIGTERM" in done.stderr, done.stderr[-3000:]
        assert not (tmp_path / "o" / "run.json").exists()
        assert not list((tmp_path / "o" / ".dedupe").glob("*")), "a generation was left"
    else:  # (at the switch itself it said "the previous outputs are untouched", exit 1, no OUT links)
        assert done.returncode == 0, done.stderr[-3000:]
        assert (tmp_path / "o" / "run.json").is_file() and "stopped" not in done.stderr


def test_a_stopped_run_leaves_no_stop_behind_in_the_process(photo_paths, tmp_path, monkeypatch):
    """main() called from Python (a notebook, a test) for a run that a signal stopped: the signal
    stayed noted in the process, and the next in-process run stopped at its first stage."""
    import gc
    from pipeline import cli, progress, write
    from pipeline.run import run
    from pipeline.config import load_config
    data = tmp_path / "d"
    data.mkdir()
    for p in photo_paths[:3]:
        (data / p.name).write_bytes(p.read_bytes())
    real = write.write_outputs

    def write_then_lose_a_signal(*args, **kwargs):
        real(*args, **kwargs)

        def collecting(phase, info):
            if phase == "start":
                gc.callbacks.remove(collecting)
                cli._stop(signal.SIGTERM, None)
        gc.callbacks.append(collecting)
        gc.collect()
    monkeypatch.setattr(write, "write_outputs", write_then_lose_a_signal)
    args = ["dedupe", str(data), "--out", str(tmp_path / "o"), "--tiers", "screen", "--scheduler", "sync", "--quiet"]
    assert cli.main(args) == 1
    assert progress.STOP.signum is None
    monkeypatch.setattr(write, "write_outputs", real)
    run(data, tmp_path / "o2", load_config(None, ["tiers=screen"]), scheduler="sync", quiet=True)
    assert (tmp_path / "o2" / "run.json").is_file()


def test_a_file_rewritten_between_screen_and_verify_is_marked_not_mixed(photo_paths, tmp_path, monkeypatch):
    data = tmp_path / "d"
    data.mkdir()
    for p in photo_paths[:3]:
        img = Image.open(p).convert("RGB")
        img.save(data / f"{p.stem}.jpg", quality=90)
        img.resize((img.width // 2, img.height // 2)).save(data / f"{p.stem}_half.jpg", quality=85)
    victim = data / f"{photo_paths[0].stem}_half.jpg"
    from pipeline import verify
    real = verify.run_verify

    def rewrite_then_verify(*args, **kwargs):  # someone saves over a file while the run goes on
        Image.open(photo_paths[5]).convert("RGB").save(victim, quality=60)
        os.utime(victim, ns=(1, 1))
        return real(*args, **kwargs)

    monkeypatch.setattr(verify, "run_verify", rewrite_then_verify)
    out = tmp_path / "out"
    assert main(["dedupe", str(data), "--out", str(out), "--tiers", "verify", "--scheduler", "sync", "--quiet"]) == 0
    images = pd.read_parquet(out / "images.parquet").set_index("path")
    assert "changed during the run" in images.loc[victim.name, "error"]
    assert pd.isna(images.loc[victim.name, "cluster_id"])
    pairs = pd.read_parquet(out / "pairs.parquet")
    touched = pairs[(pairs["path_a"] == victim.name) | (pairs["path_b"] == victim.name)]
    assert len(touched) and (touched["rule"] == "file_changed").all() and not touched["is_duplicate"].any()
    others = pairs[~pairs.index.isin(touched.index)]
    assert others["is_duplicate"].sum() == 2  # the two untouched originals still pair with their copies
    assert json.loads((out / "run.json").read_text())["counts"]["changed_during_run"] == 1


PEAK_PROBE = r"""
import os, sys
from pipeline.config import ScreenConfig
from pipeline.scan import FileEntry
from pipeline.screen import screen_file
path = sys.argv[1]
row = screen_file(FileEntry("x.png", path, os.path.getsize(path), os.stat(path).st_mtime), ScreenConfig())
print(row["error"] or "ok")
# VmHWM: this process's own peak (ru_maxrss would carry the forking parent's peak over exec)
print(next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) // 1024)
"""


def test_bombs_decode_within_the_memory_budget_or_are_refused_by_header(tmp_path):
    """Stated budget: screening one accepted image peaks below 1 GiB of process memory (the grey
    196-megapixel bomb decodes, then is reduced before any conversion); an image that would need
    more than screen.max_decode_bytes to decode is refused from its header."""
    from tests.reliability_corpus import _png_bomb
    grey, rgb = tmp_path / "grey.png", tmp_path / "rgb.png"
    grey.write_bytes(_png_bomb(14000, 14000))
    rgb.write_bytes(_png_bomb(12000, 12000, rgb=True))
    env = dict(os.environ, PYTHONPATH=str(REPO))
    results = {}
    for name, path in (("grey", grey), ("rgb", rgb)):
        out = subprocess.run([sys.executable, "-c", PEAK_PROBE, str(path)], capture_output=True, text=True,
                             env=env, cwd=REPO, timeout=300, check=True).stdout.split("\n")
        results[name] = (out[0], int(out[1]))
    assert results["grey"][0] == "ok" and results["grey"][1] < 1024, results
    assert "too large to decode" in results["rgb"][0] and results["rgb"][1] < 512, results


def _without_permission_override() -> list[str] | None:
    """A command prefix under which file modes apply to this user: none needed for an ordinary
    user; for root, util-linux's setpriv dropping the capabilities that override them; None when
    root has no setpriv."""
    if os.geteuid() != 0:
        return []
    import shutil
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return None
    return [setpriv, "--bounding-set=-dac_override,-dac_read_search", "--inh-caps=-dac_override,-dac_read_search"]


def test_a_folder_that_may_be_read_but_not_entered_is_not_taken_for_an_empty_one(tmp_path):
    """Read permission without execute lists a folder's names but no entry can be looked at: as
    DATA it was a collection of 0 files (exit 0, empty outputs published), as a subfolder its files
    were left out in silence. Now DATA stops the run (exit 2), a subfolder is named as not listed."""
    prefix = _without_permission_override()
    if prefix is None:
        pytest.skip("running as root without util-linux's setpriv: folder modes do not apply to root")
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    for i, folder in enumerate([data, data / "sub", data / "sub"]):
        Image.new("RGB", (64, 48), (40 * i, 90, 200 - 50 * i)).save(folder / f"img{i}.png")
    env = dict(os.environ, PYTHONPATH=str(REPO))

    def dedupe(root: Path, out: Path) -> subprocess.CompletedProcess:
        return subprocess.run([*prefix, sys.executable, "-m", "pipeline", "dedupe", str(root), "--out", str(out),
                               "--tiers", "screen", "--scheduler", "sync", "--no-catalog", "--quiet"],
                              capture_output=True, text=True, env=env, cwd=REPO, timeout=300)

    (data / "sub").chmod(0o600)
    try:
        done = dedupe(data, tmp_path / "o1")
        assert done.returncode == 0, done.stderr[-2000:]
        assert "could not be listed" in done.stderr and "sub (Permission denied)" in done.stderr, done.stderr
        assert json.loads((tmp_path / "o1" / "run.json").read_text())["counts"]["unlisted_folders"] == 1
        assert pd.read_parquet(tmp_path / "o1" / "images.parquet")["path"].tolist() == ["img0.png"]
        # a file this user cannot read is a row saying so, also by a name without an extension
        # (an image by its bytes, e.g. IMG_0002: it was left out unsaid); not one of another kind
        shutil.copy(data / "img0.png", data / "IMG_0002")
        (data / "notes.txt").write_text("not an image")
        for name in ("IMG_0002", "notes.txt"):
            (data / name).chmod(0)
        done = dedupe(data, tmp_path / "o3")
        assert done.returncode == 0, done.stderr[-2000:]
        rows = pd.read_parquet(tmp_path / "o3" / "images.parquet").set_index("path")
        assert sorted(rows.index) == ["IMG_0002", "img0.png"]
        assert rows.at["IMG_0002", "error"] == "cannot read: Permission denied"
        done = dedupe(data / "sub", tmp_path / "o2")
        assert done.returncode == 2 and "cannot be listed (Permission denied)" in done.stderr, done.stderr
        assert "Traceback" not in done.stderr
        assert not (tmp_path / "o2").exists()
    finally:
        (data / "sub").chmod(0o700)
        for name in ("IMG_0002", "notes.txt"):
            if (data / name).exists():
                (data / name).chmod(0o600)


def test_a_broken_exif_block_says_nothing_on_stderr(tmp_path):
    """Pillow warns "Corrupt EXIF data" as such a file is opened, without its name: on a batch
    job's stderr, noise (the picture decodes; its row is fine)."""
    from tests.reliability_corpus import _broken_exif
    data = tmp_path / "data"
    data.mkdir()
    (data / "broken_exif.jpg").write_bytes(_broken_exif())
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-m", "pipeline", "dedupe", str(data), "--out", str(tmp_path / "o"),
                           "--tiers", "verify", "--scheduler", "sync", "--quiet"], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "EXIF" not in done.stderr and "Warning" not in done.stderr, done.stderr
    assert pd.read_parquet(tmp_path / "o" / "images.parquet")["error"].isna().all()


def test_a_second_signal_while_a_stopped_run_exits_keeps_exit_1(fault_data, tmp_path):
    """SIGTERM, then another a moment later (a process group's and a direct kill, or Ctrl-C
    twice): the command put the default handlers back once it had stopped, and the second signal
    during the interpreter's shutdown made exit 1 into 143."""
    for gap in (0.01, 0.1):
        def twice(proc, gap=gap):
            proc.send_signal(signal.SIGTERM)
            time.sleep(gap)
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        rc, err = _dedupe_acting_when_logged([str(fault_data), "--out", str(tmp_path / f"o{gap}"), "--scheduler",
                                              "sync", "--no-catalog"], "candidates: started", twice)
        assert rc == 1 and "stopped by SIGTERM" in err, (gap, rc, err[-2000:])


def _dedupe_acting_when_logged(args: list[str], marker: str, act) -> tuple[int, str]:
    """`python -m pipeline dedupe *args` at INFO; `act(proc)` once a stderr line holds `marker`.
    Returns the exit code and the whole stderr."""
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "dedupe", *args, "--log-level", "INFO"],
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)), cwd=REPO)
    seen = []
    try:
        for line in proc.stderr:
            seen.append(line)
            if marker in line:
                act(proc)
                break
        seen.append(proc.stderr.read())
        rc = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    return rc, "".join(seen)


def test_an_out_removed_during_the_run_is_not_published_into(fault_data, tmp_path):
    """OUT removed while a run holds its lock (a clean-up script, an operator): the run made OUT
    again without its lock file and published, and a second run started meanwhile took a lock of
    its own and published too. Now the first stops at its publish, one line, exit 1, and leaves
    nothing in OUT."""
    out = tmp_path / "out"
    rc, err = _dedupe_acting_when_logged([str(fault_data), "--out", str(out), "--tiers", "screen", "--scheduler",
                                          "sync", "--no-catalog"], "screen: started", lambda proc: shutil.rmtree(out))
    assert rc == 1 and "was removed or replaced during the run" in err and "Traceback" not in err, err[-3000:]
    if out.exists():  # (made again by the run's own folders, if at all: no generation in it)
        assert not list((out / ".dedupe").glob("gen-*"))


def test_an_out_or_catalog_that_may_not_be_entered_is_a_usage_error(tmp_path):
    """OUT (or its catalog folder) with read permission and no execute: the check for outputs no
    run made looked at its entries first and raised a traceback (exit 1), where taking the lock
    says what to fix (exit 2)."""
    prefix = _without_permission_override()
    if prefix is None:
        pytest.skip("running as root without util-linux's setpriv: folder modes do not apply to root")
    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (64, 48), (40, 90, 200)).save(data / "img.png")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    for out, closed in ((tmp_path / "o1", tmp_path / "o1"), (tmp_path / "o2", tmp_path / "o2" / "catalog")):
        closed.mkdir(parents=True)
        (closed / "x").mkdir()
        closed.chmod(0o600)
        try:
            done = subprocess.run([*prefix, sys.executable, "-m", "pipeline", "dedupe", str(data), "--out", str(out),
                                   "--tiers", "screen", "--scheduler", "sync", "--quiet"],
                                  capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
        finally:
            closed.chmod(0o755)
        assert done.returncode == 2 and "Permission denied" in done.stderr, done.stderr[-2000:]
        assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr[-2000:]
