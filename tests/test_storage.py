"""DATA, OUT and the catalog on object storage: a real S3-compatible server (moto's server mode)
on 127.0.0.1, started and stopped here, with credentials checked (IAM auth on).

The end-to-end tests run the whole cascade on images in a bucket with an external `dask scheduler`
and two `dask worker` processes, each in its own empty folder (no shared local disk: the feature
files and the catalog go to the bucket too), and compare the outputs read back from the bucket with
a local run on the same files, and an incremental re-run with a run from scratch. Nothing here
talks to anything but 127.0.0.1.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml

from bench.cluster import Worker, external_cluster, free_port
from conftest import kill_when_logged
from pipeline import run as run_mod
from pipeline import storage

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
BUCKET = "photos"
# edits per source photo, so the cascade has pairs to decide at every tier
EDITS = {0: ["exact_copy", "jpeg_q50", "hflip"], 1: ["crop_90_centre", "text_overlay"],
         2: ["resize_50", "crop_60_offset"], 3: ["brightness", "rot90"], 4: ["crop_75_offset"],
         5: ["jpeg_q50"], 6: ["text_overlay"], 7: ["blur"], 8: ["rotate_8"], 9: ["screenshot"]}
# ORB settles most of these edits on its own; asking it for more inliers sends some to MobileNet
TIERS = ["--set", "decide.accept_inliers=200"]
N_PHOTOS = 24


def _wait_http(url: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}")
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer within {timeout}s")


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """moto_server on 127.0.0.1 with auth on; yields (endpoint, env with a valid key for it, the
    server's request log)."""
    if not (BIN / "moto_server").exists():
        pytest.skip("moto[server] is not installed (make install installs the test extras)")
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    # the first 3 requests (the IAM set-up below) are not checked; every later one is
    server_env = dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT="3", AWS_ACCESS_KEY_ID="setup",
                      AWS_SECRET_ACCESS_KEY="setup", AWS_DEFAULT_REGION="us-east-1")
    log_path = tmp_path_factory.mktemp("moto") / "moto.log"  # one line per request
    log = open(log_path, "wb")
    proc = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], env=server_env,
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_http(f"{endpoint}/moto-api/", proc)
        import boto3
        iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1",
                           aws_access_key_id="setup", aws_secret_access_key="setup")
        iam.create_user(UserName="dedupe")
        iam.put_user_policy(UserName="dedupe", PolicyName="s3", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
        key = iam.create_access_key(UserName="dedupe")["AccessKey"]
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update(AWS_ACCESS_KEY_ID=key["AccessKeyId"], AWS_SECRET_ACCESS_KEY=key["SecretAccessKey"],
                   AWS_ENDPOINT_URL=endpoint, AWS_DEFAULT_REGION="us-east-1",
                   AWS_EC2_METADATA_DISABLED="true",  # never ask a cloud metadata service
                   AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull,
                   PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="2")
        yield endpoint, env, log_path
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def _s3_client(env: dict):
    import boto3
    return boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                        aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])


def _fs(env: dict):
    import s3fs
    return s3fs.S3FileSystem(key=env["AWS_ACCESS_KEY_ID"], secret=env["AWS_SECRET_ACCESS_KEY"],
                             endpoint_url=env["AWS_ENDPOINT_URL"], skip_instance_cache=True)


@pytest.fixture(scope="module")
def dataset(photo_paths, tmp_path_factory) -> Path:
    """Real photos, edited copies (bench/transforms.py), an exact copy and a corrupt JPEG, in
    nested folders."""
    from bench import transforms
    if len(photo_paths) < N_PHOTOS:
        pytest.skip(f"need at least {N_PHOTOS} photos in ../shared/data/photos")
    root = tmp_path_factory.mktemp("s3-data") / "data"
    (root / "originals" / "2024").mkdir(parents=True)
    (root / "edits").mkdir()
    step = len(photo_paths) // N_PHOTOS
    for i in range(N_PHOTOS):
        src = photo_paths[i * step]
        folder = root / "originals" / ("2024" if i % 2 else "")
        (folder / f"p{i}{src.suffix.lower()}").write_bytes(src.read_bytes())
        for name in EDITS.get(i, []):
            data, ext, _ = transforms.render(src, name, seed=0, group=f"p{i}")
            (root / "edits" / f"p{i}_{name}{ext}").write_bytes(data)
    (root / "edits" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg" + bytes(100))
    (root / "edits" / "notes.txt").write_bytes(b"not an image, not listed")
    return root


@pytest.fixture(scope="module")
def bucket(s3, dataset) -> str:
    """The dataset uploaded to s3://photos/data/; returns the DATA URL."""
    _, env, _ = s3
    client = _s3_client(env)
    client.create_bucket(Bucket=BUCKET)
    for path in sorted(dataset.rglob("*")):
        if path.is_file():
            client.upload_file(str(path), BUCKET, f"data/{path.relative_to(dataset).as_posix()}")
    return f"s3://{BUCKET}/data"


def _run(args: list[str], env: dict, cwd: Path, timeout: int = 1200) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", "dedupe", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=timeout)


def _keras_home(models_dir: Path, where: Path) -> Path:
    """A Keras cache holding the MobileNet weights (what each worker needs besides the package)."""
    (where / "models").mkdir(parents=True)
    for f in models_dir.glob("*.h5"):
        os.symlink(f, where / "models" / f.name)
    return where


def _sorted(images: pd.DataFrame, pairs: pd.DataFrame):
    return (images.sort_values("path").reset_index(drop=True),
            pairs.sort_values(["path_a", "path_b"]).reset_index(drop=True))


@pytest.fixture(scope="module")
def cluster(s3, models_dir, tmp_path_factory):
    """An external `dask scheduler` and two `dask worker` processes, each worker in its own empty
    folder with its own Keras cache (no shared disk). Yields (address, driver env, driver folder,
    the workers' folders)."""
    _, env, _ = s3
    base = tmp_path_factory.mktemp("cluster")
    driver = base / "driver"
    driver.mkdir()
    env = dict(env, KERAS_HOME=str(_keras_home(models_dir, driver / "keras")))
    workers, worker_dirs = [], []
    for n in (1, 2):  # each worker: its own empty folder and its own Keras cache, no shared disk
        home = base / f"worker{n}"
        cwd = home / "cwd"
        cwd.mkdir(parents=True)
        worker_dirs.append(cwd)
        workers.append(Worker(cwd, env=dict(env, KERAS_HOME=str(_keras_home(models_dir, home / "keras"))),
                              name=f"w{n}"))
    with external_cluster(env, driver, workers) as (address, _):
        yield address, env, driver, worker_dirs


@pytest.mark.slow
def test_cascade_on_a_bucket_with_remote_workers_equals_a_local_run(s3, cluster, bucket, dataset, tmp_path):
    address, env, driver, worker_dirs = cluster
    out = f"s3://{BUCKET}/runs/first"
    result = _run([bucket, "--out", out, "--scheduler", address, "--quiet", *TIERS], env, driver)
    assert result.returncode == 0, result.stderr[-4000:]
    local_out = tmp_path / "local-out"
    result = _run([str(dataset), "--out", str(local_out), "--scheduler", "sync", "--no-catalog", "--quiet",
                   *TIERS], env, driver)
    assert result.returncode == 0, result.stderr[-4000:]

    storage_opts = {"key": env["AWS_ACCESS_KEY_ID"], "secret": env["AWS_SECRET_ACCESS_KEY"],
                    "endpoint_url": env["AWS_ENDPOINT_URL"]}
    remote = _sorted(pd.read_parquet(f"{out}/images.parquet", storage_options=storage_opts),
                     pd.read_parquet(f"{out}/pairs.parquet", storage_options=storage_opts))
    local = _sorted(pd.read_parquet(local_out / "images.parquet"), pd.read_parquet(local_out / "pairs.parquet"))

    # images: the same rows by relative path (mtime is the object's LastModified, not the file's)
    ri, li = remote[0].drop(columns=["mtime"]), local[0].drop(columns=["mtime"])
    pd.testing.assert_frame_equal(ri, li)
    # pairs: the same pairs, verdicts and rules; scores equal within float tolerance
    rp, lp = remote[1], local[1]
    exact_cols = ["path_a", "path_b", "image_id_a", "image_id_b", "hash_distance", "orb_matches", "orb_inliers",
                  "stage", "is_duplicate", "reason", "rule"]
    pd.testing.assert_frame_equal(rp[exact_cols], lp[exact_cols])
    for col in ("orb_score", "cosine", "ssim", "hist_corr"):
        a, b = rp[col].astype("float64").to_numpy(), lp[col].astype("float64").to_numpy()
        assert np.array_equal(np.isnan(a), np.isnan(b)), col
        np.testing.assert_allclose(a[~np.isnan(a)], b[~np.isnan(b)], atol=1e-4, err_msg=col)

    # every tier decided something, and the edits found their originals
    assert set(rp["stage"].astype(str)) >= {"exact", "verify", "confirm"}
    images = remote[0].set_index("path")
    assert images.loc["edits/p0_exact_copy.jpg", "cluster_id"] == images.loc["originals/p0.jpg", "cluster_id"]
    assert images.loc["edits/p1_crop_90_centre.jpg", "cluster_id"] == images.loc["originals/2024/p1.jpg", "cluster_id"]
    assert isinstance(images.loc["edits/broken.jpg", "error"], str)
    assert "edits/notes.txt" not in images.index

    # the publish: the pointer names a whole generation whose run.json lists what OUT holds
    fs = _fs(env)
    root = f"{BUCKET}/runs/first"
    gen = fs.cat_file(f"{root}/.dedupe/current").decode()
    manifest = json.loads(fs.cat_file(f"{root}/run.json"))
    assert json.loads(fs.cat_file(f"{root}/.dedupe/{gen}/run.json")) == manifest
    assert manifest["root"] == bucket and manifest["out"] == out
    assert manifest["config"]["storage"]["options"] == {}
    for name, digest in manifest["files"].items():
        assert hashlib.sha256(fs.cat_file(f"{root}/{name}")).hexdigest() == digest, name
    assert fs.exists(f"{root}/report/index.html")
    # the report's thumbnails and drawings, made by the remote workers (which share no disk with
    # the driver) and written by the driver from the bytes they sent: the in-process run's files
    for folder in ("thumbs", "pairs"):
        made = {p.rsplit("/", 1)[-1]: fs.cat_file(p) for p in fs.find(f"{root}/report/{folder}")}
        expected = {p.name: p.read_bytes() for p in (local_out / "report" / folder).iterdir()}
        assert made and made.keys() == expected.keys(), folder
        assert [n for n in made if made[n] != expected[n]] == [], folder
    # the lock and the work prefix are gone; the catalog (with the workers' feature files) is in
    # the bucket, unlocked; nothing was written locally
    left = [p.rsplit("/", 1)[-1] for p in fs.ls(root, refresh=True)]
    assert ".dedupe.lock" not in left and not [p for p in left if p.startswith("_work-")]
    assert manifest["reuse"]["catalog"] == f"{out}/catalog" and manifest["reuse"]["catalog_generation"] == 1
    cat = json.loads(fs.cat_file(f"{root}/catalog/manifest.json"))
    assert cat["root"] == bucket and cat["parts"] and not fs.exists(f"{root}/catalog/.catalog.lock")
    for rel, entry in cat["parts"].items():
        assert fs.size(f"{root}/catalog/{rel}") == entry["bytes"], rel
        with fs.open(f"{root}/catalog/{rel}", "rb") as fh:  # (its rows listed: no footer read per commit)
            assert pq.ParquetFile(fh).metadata.num_rows == entry["rows"], rel
    for cwd in worker_dirs:
        assert not list(cwd.rglob("*.parquet")), cwd
    assert not list(driver.rglob("*.parquet"))


def test_bad_credentials_and_missing_bucket_are_usage_errors(s3, bucket, tmp_path):
    _, env, _ = s3
    bad = dict(env, AWS_ACCESS_KEY_ID="AKIAWRONGWRONGWRONG0", AWS_SECRET_ACCESS_KEY="wrong")
    result = _run([bucket, "--out", f"s3://{BUCKET}/runs/bad", "--tiers", "screen", "--quiet"], bad, tmp_path,
                  timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "access denied" in result.stderr and "credentials" in result.stderr

    result = _run(["s3://no-such-bucket/data", "--out", str(tmp_path / "o"), "--tiers", "screen", "--quiet"],
                  env, tmp_path, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "no such bucket" in result.stderr and "s3://no-such-bucket/data" in result.stderr

    result = _run([bucket, "--out", "s3://no-such-bucket/out", "--tiers", "screen", "--quiet"], env, tmp_path,
                  timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "no such bucket" in result.stderr and "--out" in result.stderr


def test_a_locked_output_prefix_names_the_lock_to_remove(s3, bucket, tmp_path):
    _, env, _ = s3
    fs = _fs(env)
    fs.pipe_file(f"{BUCKET}/runs/locked/.dedupe.lock", json.dumps({"pid": 4242, "host": "elsewhere"}).encode())
    result = _run([bucket, "--out", f"s3://{BUCKET}/runs/locked", "--tiers", "screen", "--quiet"], env, tmp_path,
                  timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "pid 4242 on elsewhere" in result.stderr
    assert f"s3://{BUCKET}/runs/locked/.dedupe.lock" in result.stderr
    assert fs.exists(f"{BUCKET}/runs/locked/.dedupe.lock")  # someone else's lock is left alone


def test_an_object_deleted_after_listing_is_an_error_row(s3, bucket, dataset, tmp_path, monkeypatch):
    """The listing sees the object, then it is deleted before the screen reads it: one error row
    with the reason, the run completes (exit 0)."""
    _, env, _ = s3
    for k, v in env.items():
        if k.startswith("AWS_"):
            monkeypatch.setenv(k, v)
    fs = _fs(env)
    prefix = f"{BUCKET}/vanish"
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        fs.pipe_file(f"{prefix}/{name}", (dataset / "originals" / "p0.jpg").read_bytes())
    from pipeline import cli, storage
    listed = storage.iter_objects

    def listing_then_delete(url, cfg, skip=()):
        for entry in listed(url, cfg, skip):
            if entry.path == "b.jpg":
                fs.rm_file(f"{prefix}/b.jpg")
            yield entry

    monkeypatch.setattr(storage, "iter_objects", listing_then_delete)
    out = tmp_path / "out"
    code = cli.main(["dedupe", f"s3://{prefix}", "--out", str(out), "--tiers", "screen", "--scheduler", "sync",
                     "--quiet"])
    assert code == 0
    images = pd.read_parquet(out / "images.parquet").set_index("path")
    assert list(images.index) == ["a.jpg", "b.jpg", "c.jpg"]
    assert images.loc["b.jpg", "error"] == "cannot read: no such object (deleted after it was listed?)"
    assert images.loc[["a.jpg", "c.jpg"], "error"].isna().all()
    pairs = pd.read_parquet(out / "pairs.parquet")
    assert len(pairs) == 1 and pairs.loc[0, "stage"] == "exact"


def test_bad_scheme_missing_backend_and_refused_options_exit_2(tmp_path, monkeypatch):
    from pipeline.cli import main
    for key in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # each case stops before any request
    data = tmp_path / "data"
    data.mkdir()
    cases = [
        (["nosuch://bucket/x", "--out", str(tmp_path / "o")], "unknown storage scheme nosuch://"),
        ([str(data), "--out", "oci://bucket/out"], "backend is not installed"),  # fsspec knows it, ocifs is absent
        ([str(data), "--out", "s3://bucket/out", "--set", "storage.options={no_such_option: 1, endpoint_url: 'http://127.0.0.1:9', key: k, secret: s}"],
         "storage.options are not accepted"),
        ([str(data), "--out", str(tmp_path / "o"), "--catalog", "nosuch://bucket/catalog"],
         "unknown storage scheme nosuch://"),
        ([str(data), "--out", str(tmp_path / "o"), "--set", "storage.options=[1]"], "expected a mapping"),
    ]
    for args, message in cases:
        import contextlib
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = main(["dedupe", *args, "--tiers", "screen", "--scheduler", "sync", "--quiet"])
        assert code == 2, (args, err.getvalue())
        assert message in err.getvalue(), (args, err.getvalue())


def test_urls_joins_and_masked_options():
    from pipeline import storage
    assert storage.is_url("s3://b/x") and storage.is_url("gs://b") and not storage.is_url("/data")
    assert not storage.is_url("file:///data") and storage.local_form("file:///data/x") == "/data/x"
    assert storage.local_form("relative/dir") == "relative/dir"
    assert storage.join("s3://b/out/", "_work-1", "orb") == "s3://b/out/_work-1/orb"
    assert storage.join("/tmp/out", "orb") == str(Path("/tmp/out", "orb"))
    masked = storage.redacted({"key": "AKIA", "secret": "s", "endpoint_url": "http://127.0.0.1:9000",
                               "client_kwargs": {"aws_session_token": "t", "region_name": "eu-west-1"}})
    assert masked == {"key": "***", "secret": "***", "endpoint_url": "http://127.0.0.1:9000",
                      "client_kwargs": {"aws_session_token": "***", "region_name": "eu-west-1"}}


def test_report_thumbnails_and_features_from_feature_parts_on_a_store(photo_paths, tmp_path, monkeypatch):
    """The report reads the verify tier's thumbnails and keypoints from feature parts on a store
    (a work dir or catalog URL) as from a folder: no file decoded again; a row made for another
    report.thumb_size falls back to decoding the file."""
    from PIL import Image
    from pipeline import report, storage, verify
    from pipeline.config import Config
    storage.configure({})
    cfg = Config()
    files = [str(p) for p in photo_paths[:3]]
    rows = pd.DataFrame({"key": [0, 8, 16], "abs_path": files, "transform": np.zeros(3, np.int8)})
    sizes = [Image.open(f).size for f in files]
    rows["width"], rows["height"] = [w for w, _ in sizes], [h for _, h in sizes]
    part = verify.features_partition(rows, cfg, "memory://thumbs/feat", 0)["part_path"].iloc[0]
    assert part.startswith("memory://")
    decoded = []
    monkeypatch.setattr(report, "make_thumb", lambda *a: decoded.append(a) or b"")
    wanted = [(str(i), 8 * i, f) for i, f in enumerate(files)]
    made = report.thumbs_from_store(part, wanted, cfg.report.thumb_size)
    assert sorted(made) == ["0", "1", "2"] and not decoded
    for data in made.values():
        with Image.open(io.BytesIO(data)) as im:
            assert max(im.size) == cfg.report.thumb_size
    assert report.thumbs_from_store(part, wanted, 96) == {"0": b"", "1": b"", "2": b""}
    assert len(decoded) == 3  # another size: decoded (here: the stand-in that makes nothing)
    feats = report._stored_rows(part, [0, 8], cfg.verify.method)
    assert sorted(feats) == [0, 8] and len(feats[0]["keypoints"]) > 100
    # a catalog's part is checked against the bytes and sha256 it lists before it is used
    import hashlib
    from pipeline import store
    data = storage.read_bytes(part)
    good, bad = f"{len(data)}:{hashlib.sha256(data).hexdigest()}", f"{len(data)}:{'0' * 64}"
    assert sorted(report._stored_rows(part, [0, 8], cfg.verify.method, good)) == [0, 8]
    assert report._stored_rows(part, [0, 8], cfg.verify.method, bad) == {}
    with pytest.raises(store.PartChecksumError, match="not the bytes its catalog lists"):
        store.read_columns(part, [0], ["report_thumb"], check=f"{len(data) + 1}:{hashlib.sha256(data).hexdigest()}")
    decoded.clear()
    assert sorted(report.thumbs_from_store(part, wanted, cfg.report.thumb_size, good)) == ["0", "1", "2"]
    assert not decoded
    report.thumbs_from_store(part, wanted, cfg.report.thumb_size, bad)
    assert len(decoded) == 3  # a part that is not what its catalog lists: decoded instead


def test_lock_without_exclusive_create_falls_back_to_check_then_write(monkeypatch):
    """A backend that refuses mode "xb": the lock is still taken, and a second run is refused."""
    import fsspec.implementations.memory as memory

    from pipeline import storage
    from pipeline.config import ConfigError
    real_open = memory.MemoryFileSystem._open

    def no_exclusive(self, path, mode="rb", **kwargs):
        if mode == "xb":
            raise ValueError("mode xb not supported")
        return real_open(self, path, mode, **kwargs)

    monkeypatch.setattr(memory.MemoryFileSystem, "_open", no_exclusive)
    storage.configure({})
    out = "memory://locktest/out"
    with storage.locked(out):
        assert storage.filesystem(out)[0].exists("/locktest/out/.dedupe.lock")
        with pytest.raises(ConfigError, match="is in use by pid"):
            with storage.locked(out):
                pass
    assert not storage.filesystem(out)[0].exists("/locktest/out/.dedupe.lock")



def _foreign_lock(fs, path: str) -> None:
    fs.pipe_file(path, json.dumps({"pid": 4242, "host": "elsewhere", "started": "earlier", "command": "dedupe",
                                   "token": "theirs"}).encode())


def test_a_live_lock_is_kept_and_a_lock_past_its_lease_is_taken_over(caplog):
    """A store lock is a lease: refused while its holder renews it, taken over (with a warning
    naming the old holder) once it has not been renewed for lease_s; the old holder's object is
    replaced by this run's, and removed at the end."""
    from pipeline import storage
    from pipeline.config import ConfigError
    storage.configure({})
    out = "memory://leasetest/out"
    fs, root = storage.filesystem(out)
    lock = f"{root}/.dedupe.lock"
    _foreign_lock(fs, lock)
    with pytest.raises(ConfigError, match="in use by pid 4242 on elsewhere.*taken over 5 s after"):
        with storage.locked(out, lease_s=5):
            pass
    assert json.loads(fs.cat_file(lock))["token"] == "theirs"  # a live lock is left alone
    # a killed run left its catalog's lock too: the message names both objects to delete
    catalog_lock = f"{out}/catalog/.catalog.lock"
    with pytest.raises(ConfigError, match="in use by pid 4242") as refused:
        with storage.locked(out, lease_s=5, also=catalog_lock):
            pass
    assert "catalog/.catalog.lock" not in str(refused.value)  # (not there: not named)
    _foreign_lock(fs, f"{root}/catalog/.catalog.lock")
    with pytest.raises(ConfigError, match=r"delete memory://.*/\.dedupe\.lock, and memory://.*/catalog/\.catalog\.lock "
                                          "if that run held it too"):
        with storage.locked(out, lease_s=5, also=catalog_lock):
            pass
    fs.rm_file(f"{root}/catalog/.catalog.lock")
    time.sleep(1.2)
    with caplog.at_level("WARNING", logger="pipeline"):
        with storage.locked(out, lease_s=1):
            mine = json.loads(fs.cat_file(lock))
            assert mine["pid"] == os.getpid() and mine["token"] != "theirs"
    assert "taking over the lock" in caplog.text and "pid 4242 on elsewhere" in caplog.text
    assert not fs.exists(lock)


def test_a_held_lock_is_renewed_so_it_never_looks_abandoned():
    """The holder rewrites its lock every refresh_s: after longer than the lease, a second run is
    still refused; a lock taken over by another run is not removed by the first at its end."""
    from pipeline import storage
    from pipeline.config import ConfigError
    storage.configure({})
    out = "memory://leasetest/renewed"
    fs, root = storage.filesystem(out)
    lock = f"{root}/.dedupe.lock"
    with storage.locked(out, lease_s=1.0, refresh_s=0.2):
        first = storage._lock_record(fs, lock)
        time.sleep(1.5)
        assert storage._lock_record(fs, lock)["age_s"] < 1.0  # renewed meanwhile
        with pytest.raises(ConfigError, match=f"in use by pid {os.getpid()}"):
            with storage.locked(out, lease_s=1.0):
                pass
        _foreign_lock(fs, lock)  # as if this run had stalled past its lease and been taken over
        time.sleep(0.5)
    assert json.loads(fs.cat_file(lock))["token"] == "theirs" != first["token"]
    fs.rm_file(lock)


def test_a_lock_in_the_bucket_past_its_lease_is_taken_over(s3, monkeypatch):
    """The same against the S3 server, where the age is the object's LastModified (1 s steps)."""
    from pipeline.config import ConfigError
    fs = _new_bucket(s3, monkeypatch, f"{BUCKET}-lease")
    out = f"s3://{BUCKET}-lease/out"
    _foreign_lock(fs, f"{BUCKET}-lease/out/.dedupe.lock")
    with pytest.raises(ConfigError, match="in use by pid 4242"):
        with storage.locked(out, lease_s=30):
            pass
    time.sleep(2.5)
    with storage.locked(out, lease_s=1):
        assert json.loads(fs.cat_file(f"{BUCKET}-lease/out/.dedupe.lock"))["pid"] == os.getpid()
    assert not fs.exists(f"{BUCKET}-lease/out/.dedupe.lock")




def test_work_dir_run_folders_on_a_bucket_go_once_their_runs_end(s3, monkeypatch, caplog):
    """A work_dir on a store kept every run's folder (every night's features): ended runs' are
    removed by the next run, as on a local disk; one of another host's that has not ended is
    kept and named."""
    import logging
    import socket
    from pipeline import outdir
    fs = _new_bucket(s3, monkeypatch, f"{BUCKET}-work")
    work = f"s3://{BUCKET}-work/work"
    host = socket.gethostname()
    names = {"ended": "run-1-0badc0de-another-host", "dead": f"run-4194305-0badc0de-{host}",
             "elsewhere": "run-2-0badc0de-another-host", "live": f"run-{os.getpid()}-0badc0de-{host}",
             "own": f"run-{os.getpid()}-feedface-{host}"}
    for name in names.values():
        fs.pipe_file(f"{BUCKET}-work/work/{name}/embed/part-00000.parquet", b"x")
    fs.pipe_file(f"{BUCKET}-work/work/notes.txt", b"not a run's")
    outdir.mark_run_ended(f"{work}/{names['ended']}")
    caplog.set_level(logging.INFO, logger="pipeline")
    removed = outdir.remove_dead_run_folders(work, keep=f"{work}/{names['own']}")
    assert sorted(removed) == sorted([names["ended"], names["dead"]])
    left = {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(f"{BUCKET}-work/work", refresh=True)}
    assert left == {names["elsewhere"], names["live"], names["own"], "notes.txt"}
    assert names["elsewhere"] in caplog.text

# ---------------------------------------------------------------------------------------------
# gs:// through the same code: a Google Cloud Storage emulator on 127.0.0.1


@pytest.fixture(scope="module")
def gcs(dataset, tmp_path_factory):
    """gcp-storage-emulator (in memory) on 127.0.0.1 holding the dataset under gs://gphotos/data;
    yields the env a run needs to talk to it (STORAGE_EMULATOR_HOST: gcsfs's emulator switch)."""
    pytest.importorskip("gcsfs", reason="gcsfs is not installed (make install installs the test extras)")
    if not (BIN / "gcp-storage-emulator").exists():
        pytest.skip("gcp-storage-emulator is not installed (make install installs the test extras)")
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = open(tmp_path_factory.mktemp("gcs") / "emulator.log", "wb")
    proc = subprocess.Popen([str(BIN / "gcp-storage-emulator"), "start", "--host", "127.0.0.1", "--port", str(port),
                             "--in-memory"], stdout=log, stderr=subprocess.STDOUT)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "GOOGLE_"))}
    # no gRPC bucket-type probe (the emulator speaks JSON only), no metadata server, no real project
    env.update(STORAGE_EMULATOR_HOST=endpoint, GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false",
               GCE_METADATA_HOST="127.0.0.1:9", NO_GCE_CHECK="true", PYTHONPATH=str(REPO),
               TF_CPP_MIN_LOG_LEVEL="2")
    try:
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/storage/v1/b", timeout=2).read()
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"gcp-storage-emulator did not start (exit {proc.poll()})")
                time.sleep(0.3)
        code = ("import sys, gcsfs\n"
                "fs = gcsfs.GCSFileSystem(token='anon', project='test')\n"
                "fs.mkdir('gphotos')\n"
                "fs.put(sys.argv[1] + '/', 'gphotos/data/', recursive=True)\n")
        subprocess.run([sys.executable, "-c", code, str(dataset)], env=env, check=True, timeout=120)
        yield env
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


GCS_OPTIONS = "storage.options={token: anon, project: test}"


def _store_run_equals_local(env: dict, data: str, out: str, dataset: Path, tmp_path: Path, *extra: str) -> None:
    """DATA, OUT and the catalog in a store: the outputs equal a local run's; a re-run with
    nothing changed reads no object and verifies no pair again; a missing bucket exits 2."""
    args = ["--tiers", "verify", "--scheduler", "sync", "--quiet", *extra]
    result = _run([data, "--out", out, *args], env, tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    local_out = tmp_path / "local-out"
    result = _run([str(dataset), "--out", str(local_out), "--no-catalog", *args], env, tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]

    def fetch() -> dict:  # the outputs and run.json, read back through fsspec by a fresh process
        _in_a_fresh_process(env, out, "for name in ('images.parquet', 'pairs.parquet', 'run.json'):\n"
                                      "    with fsspec.open(f'{sys.argv[1]}/{name}', 'rb', **options) as src:\n"
                                      "        open(f'{sys.argv[3]}/{name}', 'wb').write(src.read())\n", str(tmp_path))
        return json.loads((tmp_path / "run.json").read_text())

    manifest = fetch()
    remote = _sorted(pd.read_parquet(tmp_path / "images.parquet"), pd.read_parquet(tmp_path / "pairs.parquet"))
    local = _sorted(pd.read_parquet(local_out / "images.parquet"), pd.read_parquet(local_out / "pairs.parquet"))
    # the same rows (mtime is the object's last-modified time, not the file's)
    pd.testing.assert_frame_equal(remote[0].drop(columns=["mtime"]), local[0].drop(columns=["mtime"]))
    pd.testing.assert_frame_equal(remote[1], local[1], check_exact=False, atol=1e-5, rtol=0)
    images = remote[0].set_index("path")
    assert images.loc["edits/p0_exact_copy.jpg", "cluster_id"] == images.loc["originals/p0.jpg", "cluster_id"]
    assert images.loc["edits/p1_crop_90_centre.jpg", "cluster_id"] == images.loc["originals/2024/p1.jpg", "cluster_id"]
    assert isinstance(images.loc["edits/broken.jpg", "error"], str) and "edits/notes.txt" not in images.index
    assert manifest["root"] == data and manifest["reuse"]["catalog"] == f"{out}/catalog"

    tags_before = _report_tags(env, out)
    requests_log = Path(env["AZURITE_DEBUG_LOG"]) if "AZURITE_DEBUG_LOG" in env else None
    since = len(requests_log.read_text(errors="replace").splitlines()) if requests_log else 0
    result = _run([data, "--out", out, *args], env, tmp_path)  # nothing changed
    assert result.returncode == 0, result.stderr[-4000:]
    # OUT's report files of unchanged bytes are not written again: their etags, new at every
    # write on GCS and Azure, stay (the content tags of both sides compared: storage.content_tag)
    tags_after = _report_tags(env, out)
    assert tags_before and tags_after == tags_before
    if requests_log:  # and the last generation's were copied on the server, not downloaded
        lines = requests_log.read_text(errors="replace").splitlines()[since:]
        downloaded = [line for line in lines if "RequestMethod=GET" in line and "/.dedupe/" in line
                      and ("/report/thumbs/" in line or "/report/pairs/" in line)]
        copied = [line for line in lines if "RequestMethod=PUT" in line and "/.dedupe/" in line
                  and "/report/thumbs/" in line and "x-ms-copy-source" in line]
        assert not downloaded and copied, (len(downloaded), len(copied))
    reuse = fetch()["reuse"]
    assert reuse["catalog_generation"] == 2
    assert reuse["screen"]["screened"] == 0 and reuse["screen"]["reused"] == len(remote[0]), reuse["screen"]
    assert reuse["verify"]["pairs_verified"] == 0
    # its report's thumbnails and drawings were carried over on the store (storage.LastReport):
    # OUT's report and the new generation's hold every one, the bytes the local run made
    stored = json.loads(_in_a_fresh_process(
        env, out, "gen = root + '/.dedupe/' + fs.cat_file(root + '/.dedupe/current').decode()\n"
                  "print(json.dumps({where: {p[len(base) + 1:]: hashlib.md5(fs.cat_file(p)).hexdigest()\n"
                  "                          for p in fs.find(base + '/report')\n"
                  "                          if p[len(base) + 1:].startswith(('report/thumbs/', 'report/pairs/'))}\n"
                  "                  for where, base in (('out', root), ('gen', gen))}))\n"))
    made = {p.relative_to(local_out).as_posix(): hashlib.md5(p.read_bytes()).hexdigest()
            for folder in ("thumbs", "pairs") for p in (local_out / "report" / folder).iterdir()}
    assert made and any(n.startswith("report/pairs/") for n in made)
    assert stored["out"] == made and stored["gen"] == made

    scheme = out.split("://")[0]
    result = _run([f"{scheme}://no-such-bucket/data", "--out", str(tmp_path / "o"), *args], env, tmp_path,
                  timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"{scheme}://no-such-bucket/data" in result.stderr


def _in_a_fresh_process(env: dict, out: str, code: str, *argv: str) -> str:
    """What `code` prints, run by a fresh process (nothing cached from the runs) with `fs, root`
    for OUT, `options` (the store's, for fsspec.open), sys, json, hashlib and fsspec at hand;
    sys.argv[3:] are `argv`."""
    options = {"token": "anon", "project": "test"} if out.startswith("gs://") else {}
    head = ("import sys, json, hashlib, fsspec\n"
            "options = json.loads(sys.argv[2])\n"
            "fs, root = fsspec.core.url_to_fs(sys.argv[1], **options)\n")
    done = subprocess.run([sys.executable, "-c", head + code, out, json.dumps(options), *argv], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def _report_tags(env: dict, out: str) -> dict[str, str]:
    """Each file of OUT's stable report -> its etag (a fresh process's listing)."""
    tags = json.loads(_in_a_fresh_process(env, out, "print(json.dumps({p[len(root) + 1:]: str(i.get('etag') or "
                                                    "i.get('ETag')) for p, i in fs.find(root + '/report', "
                                                    "detail=True).items()}))\n"))
    return {n: t for n, t in tags.items() if n.startswith(("report/thumbs/", "report/pairs/"))}


@pytest.mark.slow
def test_cascade_on_google_cloud_storage_equals_a_local_run(gcs, dataset, tmp_path):
    """gs:// through the same code (the emulator does not honour exclusive creates, so the lock is
    covered on S3 and Azure)."""
    _store_run_equals_local(gcs, "gs://gphotos/data", "gs://gphotos/runs/first", dataset, tmp_path,
                            "--set", GCS_OPTIONS)


# Azurite's documented development account (a well-known public key, not a secret)
AZURITE_ACCOUNT = ("devstoreaccount1", "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr"
                   "/KBHBeksoGMGw==")


@pytest.fixture(scope="module")
def azure(dataset, tmp_path_factory):
    """Azurite's blob service (in memory) on 127.0.0.1 holding the dataset under az://aphotos/data;
    yields the env a run needs (AZURE_STORAGE_CONNECTION_STRING, which adlfs reads)."""
    pytest.importorskip("adlfs", reason="adlfs is not installed (make install installs the test extras)")
    azurite = REPO / ".azurite" / "node_modules" / ".bin" / "azurite-blob"
    if not azurite.exists():
        pytest.skip("Azurite is not installed: run `make azurite` (npm)")
    port = free_port()
    name, key = AZURITE_ACCOUNT
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "AZURE_"))}
    env.update(AZURE_STORAGE_CONNECTION_STRING=(f"DefaultEndpointsProtocol=http;AccountName={name};AccountKey={key};"
                                                f"BlobEndpoint=http://127.0.0.1:{port}/{name};"),
               PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="2")
    folder = tmp_path_factory.mktemp("azure")
    log = open(folder / "azurite.log", "wb")
    env["AZURITE_DEBUG_LOG"] = str(folder / "requests.log")  # every request, for the tests to count
    proc = subprocess.Popen([str(azurite), "--blobHost", "127.0.0.1", "--blobPort", str(port), "--inMemoryPersistence",
                             "--skipApiVersionCheck", "--silent", "--debug", env["AZURITE_DEBUG_LOG"]],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        code = ("import sys, time, adlfs\n"
                "for _ in range(200):\n"
                "    try:\n"
                "        fs = adlfs.AzureBlobFileSystem()\n"
                "        fs.mkdir('aphotos')\n"
                "        break\n"
                "    except Exception:\n"
                "        time.sleep(0.3)\n"
                "fs.put(sys.argv[1] + '/', 'aphotos/data/', recursive=True)\n")
        subprocess.run([sys.executable, "-c", code, str(dataset)], env=env, check=True, timeout=180)
        yield env
    finally:
        proc.kill()  # in memory: nothing to flush (it ignores SIGTERM while connections linger)
        proc.wait(30)
        log.close()


@pytest.mark.slow
def test_cascade_on_azure_blob_storage_equals_a_local_run(azure, dataset, tmp_path):
    _store_run_equals_local(azure, "az://aphotos/data", "az://aphotos/runs/first", dataset, tmp_path)
    # Azurite honours exclusive creates: a held lock stops a second run, naming its holder
    code = ("import sys\n"
            "from pipeline import storage\n"
            "storage.configure({})\n"
            "with storage.locked('az://aphotos/runs/first'):\n"
            "    print('held', flush=True)\n"
            "    sys.stdin.readline()\n")
    holder = subprocess.Popen([sys.executable, "-c", code], env=azure, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        result = _run(["az://aphotos/data", "--out", "az://aphotos/runs/first", "--tiers", "screen", "--quiet"],
                      azure, tmp_path, timeout=300)
        assert result.returncode == 2 and f"in use by pid {holder.pid}" in result.stderr, result.stderr[-2000:]
    finally:
        holder.communicate("\n", timeout=60)
    assert holder.returncode == 0


@pytest.mark.slow
def test_azure_runs_keep_the_key_out_of_their_outputs_and_logs_and_know_one_place_by_two_names(azure, tmp_path):
    """On Azurite, from a helper audit of the other stores:
    - the key given as storage.options.connection_string (adlfs's own option) is in no output,
      generation or catalog manifest (it was, whole: only keys named like a secret were masked);
    - no line per HTTP request in the log (the Azure SDK logs each at INFO: thousands a run);
    - OUT spelled abfs:// inside DATA spelled az:// is not scanned by the next run (its
      thumbnails were listed as images: the URLs' texts were compared, not the place);
    - an object whose name the client parses into another as a URL ("a?b#c.jpg") is a row saying
      to rename it, not "deleted after it was listed";
    - DATA at the account's root (no container) is refused (every path lost its first letter)."""
    name, key = AZURITE_ACCOUNT
    env = dict(azure)
    connection = env.pop("AZURE_STORAGE_CONNECTION_STRING")
    config = tmp_path / "az.yaml"
    config.write_text(json.dumps({"storage": {"options": {"connection_string": connection}}}))
    _in_a_fresh_process(azure, "az://aphotos/data",
                        "import os\n"
                        "from azure.storage.blob import BlobServiceClient\n"
                        "sizes = fs.du(root, total=False)\n"
                        "files = sorted((p for p in sizes if p.endswith('.jpg')), key=lambda p: -sizes[p])[:6]\n"
                        "for p in files:\n"
                        "    fs.pipe_file('aphotos/own/' + p.rsplit('/', 1)[1], fs.cat_file(p))\n"
                        "# (through the SDK: adlfs would parse the name as a URL on the way in, too)\n"
                        "service = BlobServiceClient.from_connection_string(os.environ['AZURE_STORAGE_CONNECTION_STRING'])\n"
                        "for name in ('odd/a?b#c.jpg', 'odd/plain.jpg'):\n"
                        "    service.get_blob_client('aphotos', name).upload_blob(fs.cat_file(files[0]), overwrite=True)\n")
    args = ["--config", str(config), "--tiers", "screen", "--scheduler", "sync", "--quiet"]
    first = _run(["az://aphotos/own", "--out", "abfs://aphotos/own/out-abfs", *args], env, tmp_path, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "http_logging_policy" not in first.stderr and "Request URL" not in first.stderr
    assert len(first.stderr.splitlines()) < 40, first.stderr[-3000:]
    again = _run(["az://aphotos/own", "--out", "abfs://aphotos/own/out-abfs", *args], env, tmp_path, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    found = json.loads(_in_a_fresh_process(
        azure, "az://aphotos/own/out-abfs",
        "import pyarrow.parquet as pq\n"
        "texts = {p: fs.cat_file(p).decode('latin-1') for p in fs.find(root) if p.endswith(('.json', '.parquet'))}\n"
        "files = [pq.read_table(fs.open(root + '/images.parquet')).num_rows for _ in range(1)]\n"
        "manifest = json.loads(fs.cat_file(root + '/run.json'))\n"
        "print(json.dumps({'leaks': sorted(p for p, t in texts.items() if sys.argv[3] in t),\n"
        "                  'looked': len(texts), 'files': files[0], 'counts': manifest['counts']}))\n", key))
    assert found["looked"] >= 6 and found["leaks"] == [], found
    # (the second run listed DATA's 6 images only, not the first run's OUT and its thumbnails)
    assert found["counts"]["files"] == found["files"] == 6, found

    odd = _run(["az://aphotos/odd", "--out", str(tmp_path / "odd-out"), "--no-catalog", *args], env, tmp_path,
               timeout=300)
    assert odd.returncode == 0, odd.stderr[-3000:]
    images = pd.read_parquet(tmp_path / "odd-out" / "images.parquet").set_index("path")
    assert "rename the object" in images.loc["a?b#c.jpg", "error"] and pd.isna(images.loc["plain.jpg", "error"])

    bare = _run(["az://", "--out", str(tmp_path / "bare"), *args], env, tmp_path, timeout=300)
    assert bare.returncode == 2 and "names no bucket or container" in bare.stderr, bare.stderr[-2000:]


@pytest.mark.slow
def test_workers_that_cannot_open_the_bucket_stop_the_run_with_exit_2(s3, bucket, tmp_path):
    """The driver has the credentials and the endpoint, the cluster's workers do not (their own
    environment): the run stops before any work, exit 2, naming a worker and what to give them,
    instead of a traceback from the first task (or, without the endpoint, asking the public
    cloud for a bucket of that name)."""
    _, env, _ = s3
    cases = {"credentials": {k: v for k, v in env.items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")},
             "endpoint": dict({k: v for k, v in env.items() if k != "AWS_ENDPOINT_URL"},
                              AWS_ENDPOINT_URL="http://127.0.0.1:9")}  # (not the public cloud, even by mistake)
    for name, worker_env in cases.items():
        (tmp_path / name / "scheduler").mkdir(parents=True)
        (tmp_path / name / "worker").mkdir()
        with external_cluster(env, tmp_path / name / "scheduler",
                              [Worker(tmp_path / name / "worker", env=worker_env)]) as (address, _):
            result = _run([bucket, "--out", str(tmp_path / name / "out"), "--scheduler", address, "--tiers",
                           "screen", "--quiet"], env, tmp_path, timeout=300)
        assert result.returncode == 2, result.stderr[-3000:]
        assert f"1 of 1 Dask workers cannot open the input location {bucket}" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr and "driver's environment variables do not reach" in result.stderr
        assert not (tmp_path / name / "out" / "images.parquet").exists()


def test_out_and_its_catalog_inside_data_on_the_bucket_are_not_scanned(s3, dataset, monkeypatch):
    """OUT (with its catalog) under DATA's prefix: the next run does not list the last one's
    report as images."""
    env, _, _, fs, prefix, data, _, args = _screen_on_bucket(s3, monkeypatch, dataset, "nested")
    out = f"{data}/out"
    args = ["--tiers", "verify", "--scheduler", "sync", "--quiet"]
    for _ in range(2):
        assert _dedupe(data, "--out", out, *args) == 0
        images, pairs = _read_outputs(out, env)
        assert not images["path"].str.startswith("out/").any()
        assert len(images) == _run_json(fs, out)["counts"]["files"]
    assert fs.find(f"{out.removeprefix('s3://')}/report/thumbs") and fs.find(f"{out.removeprefix('s3://')}/catalog")
    expected = sorted(p.relative_to(dataset).as_posix() for p in dataset.rglob("*") if p.is_file()
                      and p.name != "notes.txt")
    assert sorted(images["path"]) == expected


# ---------------------------------------------------------------------------------------------
# the catalog in the bucket


def _aws_env(monkeypatch, env: dict) -> None:
    """This process talks to the moto server as the runs do (for in-process runs and checks)."""
    for key in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        if key.startswith("AWS_"):
            monkeypatch.setenv(key, value)



def _new_bucket(s3, monkeypatch, name: str):
    """This process talks to the S3 server (`_aws_env`) with no stored options; a new bucket
    `name` on it, and an s3fs filesystem to look at it."""
    _, env, _ = s3
    _aws_env(monkeypatch, env)
    storage.configure({})
    fs = _fs(env)
    fs.mkdir(name)
    return fs

def _upload(client, folder: Path, prefix: str) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            client.upload_file(str(path), BUCKET, f"{prefix}/{path.relative_to(folder).as_posix()}")


def _read_outputs(out: str | Path, env: dict) -> tuple[pd.DataFrame, pd.DataFrame]:
    opts = {"key": env["AWS_ACCESS_KEY_ID"], "secret": env["AWS_SECRET_ACCESS_KEY"],
            "endpoint_url": env["AWS_ENDPOINT_URL"]} if str(out).startswith("s3://") else None
    return _sorted(pd.read_parquet(f"{out}/images.parquet", storage_options=opts),
                   pd.read_parquet(f"{out}/pairs.parquet", storage_options=opts))


def _assert_same_outputs(a: tuple, b: tuple) -> None:
    """images and pairs equal (same objects, so the same mtimes too); floats within 1e-5 (float32
    scores, the stored values are the same numbers)."""
    for x, y in zip(a, b):
        pd.testing.assert_frame_equal(x, y, check_exact=False, atol=1e-5, rtol=0)


def _run_json(fs, out: str) -> dict:
    return json.loads(fs.cat_file(f"{out.removeprefix('s3://')}/run.json"))


def _object_gets(log_path: Path, since: int, prefix: str) -> list[str]:
    """Keys under `prefix` whose bytes were read (GET of the object, not a listing) in the server's
    request log after its first `since` lines."""
    lines = log_path.read_text(errors="replace").splitlines()[since:]
    marker = f'"GET /{BUCKET}/{prefix}/'
    return sorted(line.split(marker, 1)[1].split(" ", 1)[0] for line in lines if marker in line)


def _log_lines(log_path: Path) -> int:
    return len(log_path.read_text(errors="replace").splitlines())


def _screen_on_bucket(s3, monkeypatch, dataset: Path, name: str):
    """The dataset uploaded under `name`/data in the bucket, the AWS environment set: (env, the
    server's request log, boto3 client, fsspec filesystem, prefix, DATA url, OUT url, the args of
    an in-process screen-only run into OUT)."""
    _, env, log_path = s3
    _aws_env(monkeypatch, env)
    client, fs = _s3_client(env), _fs(env)
    prefix = f"{name}/data"
    _upload(client, dataset, prefix)
    data, out = f"s3://{BUCKET}/{prefix}", f"s3://{BUCKET}/{name}/out"
    return env, log_path, client, fs, prefix, data, out, ["--out", out, "--tiers", "screen", "--scheduler", "sync",
                                                         "--quiet"]


def _dedupe(*args: str) -> int:
    from pipeline.cli import main
    return main(["dedupe", *args])


@pytest.mark.slow
def test_a_catalog_in_the_bucket_makes_the_rerun_incremental_and_equal_to_a_run_from_scratch(
        s3, cluster, bucket, dataset, photo_paths, tmp_path):
    """Run on a bucket (the catalog defaults to OUT/catalog in the bucket; the workers write the
    feature parts there), add, move and delete objects, run again: the same outputs as a run from
    scratch, and run.json says what was reused (unchanged objects not read, pairs not rescored)."""
    from bench import transforms
    address, env, driver, worker_dirs = cluster
    client, fs = _s3_client(env), _fs(env)
    prefix = "grow/data"
    data, out = f"s3://{BUCKET}/{prefix}", f"s3://{BUCKET}/grow/out"
    _upload(client, dataset, prefix)
    result = _run([data, "--out", out, "--scheduler", address, "--quiet", *TIERS], env, driver)
    assert result.returncode == 0, result.stderr[-4000:]
    first = _run_json(fs, out)
    assert first["reuse"]["screen"]["reused"] == 0 and first["reuse"]["catalog"] == f"{out}/catalog"

    # add a resized copy of p10, a byte copy of p3 and a photo of no group; move one edit; delete two
    p10 = next((dataset / "originals").glob("p10.*"))
    resized, ext, _ = transforms.render(p10, "resize_50", seed=1, group="p10")
    p3 = next((dataset / "originals" / "2024").glob("p3.*"))
    step = len(photo_paths) // N_PHOTOS
    used = {photo_paths[i * step] for i in range(N_PHOTOS)}
    extra = next(p for p in photo_paths if p not in used)
    added = {f"edits/p10_resize_50b{ext}": resized, f"new/p3_copy{p3.suffix}": p3.read_bytes(),
             f"new/extra{extra.suffix.lower()}": extra.read_bytes()}
    for rel, body in added.items():
        fs.pipe_file(f"{BUCKET}/{prefix}/{rel}", body)
    blur = next((dataset / "edits").glob("p7_blur.*")).name
    fs.copy(f"{BUCKET}/{prefix}/edits/{blur}", f"{BUCKET}/{prefix}/moved/{blur}")
    gone = [f"edits/{blur}", f"originals/{next((dataset / 'originals').glob('p0.*')).name}",
            f"edits/{next((dataset / 'edits').glob('p2_resize_50.*')).name}"]
    for rel in gone:
        fs.rm_file(f"{BUCKET}/{prefix}/{rel}")

    result = _run([data, "--out", out, "--scheduler", address, "--quiet", *TIERS], env, driver)
    assert result.returncode == 0, result.stderr[-4000:]
    second = _run_json(fs, out)
    scratch = tmp_path / "scratch"
    result = _run([data, "--out", str(scratch), "--scheduler", "sync", "--no-catalog", "--quiet", *TIERS],
                  env, driver)
    assert result.returncode == 0, result.stderr[-4000:]
    _assert_same_outputs(_read_outputs(out, env), _read_outputs(scratch, env))

    reuse = second["reuse"]
    new = len(added) + 1  # the moved object is a new key (its content's features are reused)
    assert reuse["screen"]["screened"] == new and reuse["screen"]["why_screened"] == {"new": new}
    assert reuse["screen"]["reused"] == second["counts"]["files"] - new  # not read again
    assert reuse["candidates"]["added"] >= 1 and reuse["candidates"]["lists_reused"] > 0
    assert reuse["verify"]["pairs_reused"] > 0 and reuse["verify"]["pairs_verified"] > 0
    assert reuse["confirm"]["pairs_reused"] > 0
    assert reuse["problems"] == [] and reuse["catalog_generation"] == 2
    pairs = _read_outputs(out, env)[1]
    assert not (set(pairs["path_a"]) | set(pairs["path_b"])) & set(gone)
    dup = pairs[pairs["is_duplicate"]]
    assert {f"edits/p10_resize_50b{ext}", f"new/p3_copy{p3.suffix}"} <= set(dup["path_a"]) | set(dup["path_b"])

    # an unchanged re-run reads no object and scores no pair
    result = _run([data, "--out", out, "--scheduler", address, "--quiet", *TIERS], env, driver)
    assert result.returncode == 0, result.stderr[-4000:]
    third = _run_json(fs, out)["reuse"]
    assert third["screen"]["screened"] == 0 and third["verify"]["pairs_verified"] == 0
    assert third.get("confirm", {}).get("pairs_embedded", 0) == 0 and third["catalog_generation"] == 3
    _assert_same_outputs(_read_outputs(out, env), _read_outputs(scratch, env))
    # the catalog's files all come from its last two generations; nothing was written locally
    manifest = json.loads(fs.cat_file(f"{BUCKET}/grow/out/catalog/manifest.json"))
    for rel, entry in {**{e["file"]: e for e in manifest["tables"].values()}, **manifest["parts"]}.items():
        assert fs.size(f"{BUCKET}/grow/out/catalog/{rel}") == entry["bytes"], rel
    for cwd in worker_dirs:
        assert not list(cwd.rglob("*.parquet")), cwd


def test_a_second_run_on_a_catalog_in_the_bucket_exits_2_naming_the_holder(s3, bucket, tmp_path, monkeypatch):
    from pipeline import catalog, storage
    _, env, _ = s3
    _aws_env(monkeypatch, env)
    fs = _fs(env)
    url = f"s3://{BUCKET}/lock/catalog"
    args = [bucket, "--out", f"s3://{BUCKET}/lock/out", "--catalog", url, "--tiers", "screen", "--quiet"]
    storage.configure({})
    with storage.locked(url, name=catalog.LOCK_NAME, what="catalog", option="--catalog"):  # what a run holds
        result = _run(args, env, tmp_path, timeout=300)
        assert result.returncode == 2, result.stderr[-2000:]
        assert f"the catalog {url!r} is in use by pid {os.getpid()}" in result.stderr
        assert "another --catalog" in result.stderr and f"{url}/{catalog.LOCK_NAME}" in result.stderr
    assert not fs.exists(f"{BUCKET}/lock/out/.dedupe.lock")  # the refused run let OUT go
    result = _run(args, env, tmp_path, timeout=300)  # the holder is done: the run goes through
    assert result.returncode == 0, result.stderr[-2000:]
    assert fs.exists(f"{BUCKET}/lock/catalog/manifest.json") and not fs.exists(f"{BUCKET}/lock/catalog/.catalog.lock")


def _verified_into_bucket(s3, bucket: str, monkeypatch, name: str) -> tuple[dict, object, str, list[str], str]:
    """A first in-process run to the verify tier into s3://BUCKET/`name`/out (its catalog in the
    bucket): (env, fsspec filesystem, OUT, the run's args, the catalog's bucket path)."""
    _, env, _ = s3
    _aws_env(monkeypatch, env)
    out = f"s3://{BUCKET}/{name}/out"
    args = ["--tiers", "verify", "--scheduler", "sync", "--quiet"]
    assert _dedupe(bucket, "--out", out, *args) == 0
    return env, _fs(env), out, args, f"{BUCKET}/{name}/out/catalog"


def test_a_corrupt_catalog_object_is_reported_and_rebuilt(s3, bucket, tmp_path, monkeypatch):
    env, fs, out, args, root = _verified_into_bucket(s3, bucket, monkeypatch, "corrupt")
    manifest = json.loads(fs.cat_file(f"{root}/manifest.json"))
    evidence = f"{root}/{manifest['tables']['evidence']['file']}"
    body = fs.cat_file(evidence)
    fs.pipe_file(evidence, body[:-50] + b"\0" * 50)  # same size, other bytes
    part = sorted(manifest["parts"])[0]
    fs.pipe_file(f"{root}/{part}", b"not parquet")
    assert _dedupe(bucket, "--out", out, *args) == 0
    reuse = _run_json(fs, out)["reuse"]
    assert any("evidence" in p and "checksum mismatch" in p for p in reuse["problems"]), reuse["problems"]
    assert reuse["verify"]["pairs_verified"] > 0  # the evidence was lost: pairs scored again
    assert _dedupe(bucket, "--out", str(tmp_path / "scratch"), "--no-catalog", *args) == 0
    _assert_same_outputs(_read_outputs(out, env), _read_outputs(tmp_path / "scratch", env))
    assert _dedupe(bucket, "--out", out, *args) == 0  # the rebuilt catalog is whole again
    again = _run_json(fs, out)["reuse"]
    assert again["problems"] == [] and again["verify"]["pairs_verified"] == 0


def test_catalog_parts_in_the_bucket_are_checked_by_size_and_entity_tag(s3, bucket, tmp_path, monkeypatch):
    """The commit lists each part's entity tag beside its size and sha256; a later run checks a
    stored part by its size and tag (a HEAD), not by reading it whole to hash it. Another tag
    (a copied catalog; an entry from before tags) is settled by hashing the part, and the next
    manifest lists the part's tag; a part rewritten with other bytes of the same size is found
    by its hash, reported, and its features recomputed."""
    from pipeline import catalog, storage, store
    first_hashed: list[str] = []
    real_hashed = catalog._hashed_entry
    monkeypatch.setattr(catalog, "_hashed_entry", lambda files, rel: first_hashed.append(rel) or real_hashed(files, rel))
    env, fs, out, args, root = _verified_into_bucket(s3, bucket, monkeypatch, "tagged")
    monkeypatch.setattr(catalog, "_hashed_entry", real_hashed)

    def manifest() -> dict:
        return json.loads(fs.cat_file(f"{root}/manifest.json"))

    def tag_of(rel: str) -> str:
        return fs.info(f"{root}/{rel}", refresh=True)["ETag"].strip('"')

    parts = manifest()["parts"]
    assert parts and all((e["bytes"], e["etag"]) == (fs.size(f"{root}/{rel}"), tag_of(rel)) for rel, e in parts.items())
    # the first commit listed its parts by their writer's digests: none was read back to hash it
    assert first_hashed == [] and all(e["sha256"] == hashlib.sha256(fs.cat_file(f"{root}/{rel}")).hexdigest()
                                      for rel, e in parts.items())
    hashed: list[str] = []
    real = catalog.Catalog._checked_bytes
    monkeypatch.setattr(catalog.Catalog, "_checked_bytes",
                        lambda self, rel, entry=None: hashed.append(rel) or real(self, rel, entry))

    def rerun(ratio: str) -> dict:  # another ratio: every pair scored again from the stored features
        hashed.clear()
        assert _dedupe(bucket, "--out", out, *args, "--set", f"verify.ratio={ratio}") == 0
        return _run_json(fs, out)["reuse"]

    reuse = rerun("0.75")
    assert reuse["problems"] == [] and reuse["verify"]["features_reused"] > 0
    assert reuse["verify"]["features_computed"] == 0
    assert hashed and not set(hashed) & set(parts)  # (the tables are hashed, the parts are not)
    part = sorted(parts)[0]
    # the report's check of a part carries its tag: compared, not the bytes hashed
    storage.configure({})
    entry = parts[part]
    assert store.read_columns(f"s3://{root}/{part}", [], ["width"],
                              check=f"{entry['bytes']}:{entry['sha256']}:{entry['etag']}").empty
    # a manifest whose tag is not the object's (a copied catalog), then one with no tag (an older
    # version's): the part is hashed, found right, and the next manifest lists its tag
    for edit in (lambda e: {**e, "etag": "0" + e["etag"]}, lambda e: {k: v for k, v in e.items() if k != "etag"}):
        edited = manifest()
        edited["parts"][part] = edit(edited["parts"][part])
        fs.pipe_file(f"{root}/manifest.json", json.dumps(edited).encode())
        reuse = rerun("0.7" if "etag" in edited["parts"][part] else "0.72")
        assert reuse["problems"] == [] and reuse["verify"]["features_computed"] == 0
        assert part in hashed and manifest()["parts"][part]["etag"] == tag_of(part)
    body = fs.cat_file(f"{root}/{part}")
    edited = bytearray(body)
    edited[len(body) // 2] ^= 0x01  # (inside a column chunk's pages)
    fs.pipe_file(f"{root}/{part}", bytes(edited))
    reuse = rerun("0.74")
    assert [p for p in reuse["problems"] if part in p and "checksum mismatch" in p], reuse["problems"]
    assert reuse["verify"]["features_computed"] > 0  # the part's features made again
    assert _dedupe(bucket, "--out", str(tmp_path / "scratch"), "--no-catalog", *args,
                   "--set", "verify.ratio=0.74") == 0
    _assert_same_outputs(_read_outputs(out, env), _read_outputs(tmp_path / "scratch", env))


def test_catalog_parts_in_the_bucket_are_compacted_and_still_give_the_same_results(s3, bucket, tmp_path,
                                                                                  monkeypatch):
    from pipeline import catalog
    _, env, _ = s3
    _aws_env(monkeypatch, env)
    fs = _fs(env)
    out = f"s3://{BUCKET}/compact/out"
    args = ["--tiers", "verify", "--scheduler", "sync", "--quiet"]
    assert _dedupe(bucket, "--out", out, *args) == 0
    before = json.loads(fs.cat_file(f"{BUCKET}/compact/out/catalog/manifest.json"))
    monkeypatch.setattr(catalog, "COMPACT_MAX_PARTS", 0)  # compact whatever there is
    assert _dedupe(bucket, "--out", out, *args) == 0
    compacted = _run_json(fs, out)["reuse"]["catalog_compacted"]
    assert [c["kind"] for c in compacted] == ["orb"] and compacted[0]["rows_kept"] == before["counts"]["features"]
    manifest = json.loads(fs.cat_file(f"{BUCKET}/compact/out/catalog/manifest.json"))
    assert manifest["parts"] and all("/compact-" in rel for rel in manifest["parts"])
    monkeypatch.setattr(catalog, "COMPACT_MAX_PARTS", 64)
    # a matching setting changed: every pair is verified again from the compacted features
    assert _dedupe(bucket, "--out", out, *args, "--set", "verify.ratio=0.7") == 0
    verify = _run_json(fs, out)["reuse"]["verify"]
    assert verify["features_reused"] > 0 and verify["features_computed"] == 0
    assert _dedupe(bucket, "--out", str(tmp_path / "scratch"), "--no-catalog", *args, "--set", "verify.ratio=0.7") == 0
    _assert_same_outputs(_read_outputs(out, env), _read_outputs(tmp_path / "scratch", env))
    # the old generation's parts stay one more generation, older ones are removed
    left = {p.split("/catalog/", 1)[1] for p in fs.find(f"{BUCKET}/compact/out/catalog/features")}
    assert not set(before["parts"]) & left


@pytest.mark.slow
def test_kill_9_leaves_the_last_catalog_in_the_bucket_and_its_finished_features_are_adopted(
        s3, bucket, tmp_path, monkeypatch):
    _, env, _ = s3
    _aws_env(monkeypatch, env)
    fs = _fs(env)
    out = f"s3://{BUCKET}/killed/out"
    args = ["--tiers", "verify", "--scheduler", "sync"]
    changed = ["--set", "verify.n_features=450"]  # so the run has ORB work to be killed in
    assert _dedupe(bucket, "--out", out, *args, "--quiet") == 0
    manifest_before = fs.cat_file(f"{BUCKET}/killed/out/catalog/manifest.json")
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "dedupe", bucket, "--out", out, *args, *changed],
                            stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    kill_when_logged(proc, "verify: started")  # the features are in the bucket, no pair is scored yet
    assert proc.returncode == -signal.SIGKILL
    assert fs.cat_file(f"{BUCKET}/killed/out/catalog/manifest.json") == manifest_before  # the last good one
    # a killed run leaves its lock objects: a run within their lease names them
    result = _run([bucket, "--out", out, *args, "--quiet", *changed], env, tmp_path, timeout=300)
    assert result.returncode == 2 and f"delete {out}/.dedupe.lock" in result.stderr, result.stderr[-2000:]
    fs.rm_file(f"{BUCKET}/killed/out/.dedupe.lock")
    result = _run([bucket, "--out", out, *args, "--quiet", *changed], env, tmp_path, timeout=300)
    assert result.returncode == 2 and f"delete {out}/catalog/.catalog.lock" in result.stderr, result.stderr[-2000:]
    fs.rm_file(f"{BUCKET}/killed/out/catalog/.catalog.lock")
    assert _dedupe(bucket, "--out", out, *args, "--quiet", *changed) == 0
    reuse = _run_json(fs, out)["reuse"]
    assert reuse["problems"] == []
    assert reuse["verify"]["features_adopted_from_killed_run"] > 0 and reuse["verify"]["features_computed"] == 0
    assert _dedupe(bucket, "--out", str(tmp_path / "scratch"), "--no-catalog", *args, "--quiet", *changed) == 0
    _assert_same_outputs(_read_outputs(out, env), _read_outputs(tmp_path / "scratch", env))
    assert not [p for p in fs.ls(f"{BUCKET}/killed/out", refresh=True) if "/_work-" in p]  # the killed run's


def test_query_against_a_catalog_in_the_bucket(s3, bucket, dataset, tmp_path, monkeypatch, capsys):
    from pipeline.cli import main
    from pipeline.query import query
    _, env, _ = s3
    _aws_env(monkeypatch, env)
    out = f"s3://{BUCKET}/query/out"
    assert _dedupe(bucket, "--out", out, "--tiers", "verify", "--scheduler", "sync", "--quiet") == 0
    pairs = _read_outputs(out, env)[1]
    rel = "edits/p1_crop_90_centre.jpg"
    image = dataset / rel  # the same bytes as the catalog's object, read from a local copy
    got = query([image], f"{out}/catalog")
    mine = pairs[(pairs["path_a"] == rel) | (pairs["path_b"] == rel)]
    want = mine.assign(path=mine["path_a"].where(mine["path_b"] == rel, mine["path_b"]).to_numpy())
    cols = ["path", "hash_distance", "orb_matches", "orb_inliers", "is_duplicate", "rule"]
    # the batch job's pairs of that object, plus the object itself (an exact copy of the query)
    itself = got[got["path"] == rel]
    assert len(itself) == 1 and itself["is_duplicate"].all() and itself["stage"].iloc[0] == "exact"
    g = got[got["path"] != rel][cols].sort_values("path").reset_index(drop=True)
    w = want[cols].sort_values("path").reset_index(drop=True)
    for frame in (g, w):
        frame["rule"] = frame["rule"].astype(str)
        frame["hash_distance"] = frame["hash_distance"].astype("int64")
    pd.testing.assert_frame_equal(g, w, check_dtype=False)
    assert g["is_duplicate"].any()
    assert main(["query", str(image), "--catalog", f"{out}/catalog"]) == 0
    assert "originals/2024/p1.jpg" in capsys.readouterr().out
    assert main(["query", str(image), "--catalog", f"{out}/catalog", "--add"]) == 2
    assert "--add with a catalog on object storage" in capsys.readouterr().err
    assert main(["query", str(image), "--catalog", f"s3://{BUCKET}/query/nothing"]) == 2
    assert "no catalog at" in capsys.readouterr().err


def test_a_rerun_reads_only_new_and_rewritten_objects(s3, bucket, dataset, tmp_path, monkeypatch):
    """The server's own request log: the re-run GETs the new object and the rewritten one, and
    no other image (an object without an image extension may be sniffed, 32 bytes, when listed):
    not the screen, and not the report either, which copies the last report's thumbnails of
    unchanged bytes instead of making them again from the images."""
    env, log_path, client, fs, prefix, data, out, args = _screen_on_bucket(s3, monkeypatch, dataset, "reread")
    since = _log_lines(log_path)
    assert _dedupe(data, *args) == 0
    first = _object_gets(log_path, since, prefix)
    files = _run_json(fs, out)["counts"]["files"]
    assert len(set(first) - {"edits/notes.txt"}) == files  # the first run reads every image
    # a byte copy of an image already shown in the report (its thumbnail is reused), and a rewrite
    p0 = next((dataset / "originals").glob("p0.*")).name
    fs.pipe_file(f"{BUCKET}/{prefix}/new/p0_again.jpg", (dataset / "originals" / p0).read_bytes())
    rewritten = next((dataset / "edits").glob("p8_rotate_8.*")).name
    fs.pipe_file(f"{BUCKET}/{prefix}/edits/{rewritten}", (dataset / "edits" / rewritten).read_bytes() + b"\0")
    since = _log_lines(log_path)
    assert _dedupe(f"{data}/", *args) == 0  # the same prefix, with its trailing "/"
    assert set(_object_gets(log_path, since, prefix)) - {"edits/notes.txt"} == {"new/p0_again.jpg",
                                                                                f"edits/{rewritten}"}
    assert fs.find(f"{BUCKET}/reread/out/report/thumbs")  # the report still shows every cluster
    reuse = _run_json(fs, out)["reuse"]["screen"]
    assert reuse["screened"] == 2 and reuse["reused"] == files - 1
    assert reuse["why_screened"] == {"new": 1, "changed_size_or_mtime": 1}
    assert _dedupe(data, "--out", str(tmp_path / "scratch"), "--tiers", "screen", "--scheduler", "sync",
                   "--quiet", "--no-catalog") == 0
    _assert_same_outputs(_read_outputs(out, env), _read_outputs(tmp_path / "scratch", env))


def _object_puts(log_path: Path, since: int, prefix: str) -> list[str]:
    """Keys under `prefix` written (PUT: an upload or a server-side copy) after line `since`."""
    lines = log_path.read_text(errors="replace").splitlines()[since:]
    marker = f'"PUT /{BUCKET}/{prefix}/'
    return sorted(line.split(marker, 1)[1].split(" ", 1)[0] for line in lines if marker in line)


def _report_objects(fs, prefix: str) -> dict[str, bytes]:
    fs.invalidate_cache(prefix)
    return {p[len(prefix) + 1:]: fs.cat_file(p) for p in fs.find(prefix)}


def test_a_rerun_carries_the_reports_thumbnails_over_on_the_server(s3, bucket, dataset, tmp_path, monkeypatch):
    """An unchanged re-run neither downloads the last report's thumbnails and drawings nor uploads
    them again: the new generation gets them by server-side copies, and OUT's stable names, which
    already hold those bytes, are not written again. The new generation is still whole (every file
    of the report, the same bytes), and a rewritten image gets a new thumbnail in both places."""
    import s3fs
    env, log_path, client, fs, prefix, data, out, args = _screen_on_bucket(s3, monkeypatch, dataset, "carry")
    args = [a if a != "screen" else "verify" for a in args]  # (ORB: the report also draws pairs)
    root = out.removeprefix("s3://")
    assert _dedupe(data, *args) == 0
    first = _report_objects(fs, f"{root}/report")
    assert any(n.startswith("thumbs/") for n in first) and any(n.startswith("pairs/") for n in first)
    uploaded: list[str] = []
    real_put = s3fs.S3FileSystem._put_file

    async def spy(self, lpath, rpath, *a, **kw):
        uploaded.append(rpath)
        return await real_put(self, lpath, rpath, *a, **kw)
    monkeypatch.setattr(s3fs.S3FileSystem, "_put_file", spy)

    since = _log_lines(log_path)
    assert _dedupe(data, *args) == 0
    gen = f"{root}/.dedupe/{fs.cat_file(f'{root}/.dedupe/current').decode()}"
    # nothing of the last report was read but its two indexes, no thumbnail or drawing uploaded
    read = _object_gets(log_path, since, f"{root.removeprefix(BUCKET + '/')}/.dedupe")
    assert sorted(k.split("/", 1)[-1] for k in read if k != "current") == ["report/drawings.json",
                                                                          "report/thumbs.json"], read
    assert not [p for p in uploaded if "/report/thumbs/" in p or "/report/pairs/" in p], uploaded
    # OUT's stable thumbnails and drawings were not written again: they hold the same bytes
    rewritten = _object_puts(log_path, since, f"{root.removeprefix(BUCKET + '/')}/report")
    assert not [k for k in rewritten if k.startswith(("thumbs/", "pairs/"))], rewritten
    # the generation is whole and the stable report is its copy
    second, in_gen = _report_objects(fs, f"{root}/report"), _report_objects(fs, f"{gen}/report")
    assert in_gen == second
    assert {n: b for n, b in second.items() if n.startswith(("thumbs/", "pairs/"))} == \
        {n: b for n, b in first.items() if n.startswith(("thumbs/", "pairs/"))}
    assert json.loads(second["thumbs.json"]) == json.loads(first["thumbs.json"])

    # another photo's bytes under an image's name: its thumbnail is made again, everywhere
    p0 = next((dataset / "originals").glob("p0.*")).name
    other = next(p for p in sorted((dataset / "originals" / "2024").iterdir()) if p.suffix == Path(p0).suffix)
    fs.pipe_file(f"{BUCKET}/{prefix}/originals/{p0}", other.read_bytes())
    from pipeline.run import image_ids
    image_id = str(image_ids([f"originals/{p0}"])[0])
    assert _dedupe(data, *args) == 0
    gen = f"{root}/.dedupe/{fs.cat_file(f'{root}/.dedupe/current').decode()}"
    third, in_gen = _report_objects(fs, f"{root}/report"), _report_objects(fs, f"{gen}/report")
    assert in_gen == third
    assert third[f"thumbs/{image_id}.jpg"] != first[f"thumbs/{image_id}.jpg"]
    assert json.loads(third["thumbs.json"])[image_id] != json.loads(first["thumbs.json"])[image_id]


def test_a_carried_file_that_vanished_fails_the_publish_and_keeps_the_last_generation(s3, monkeypatch):
    """publish's server-side copy of a carried report file whose source is gone: a clear error,
    the half-made generation removed, OUT's pointer and stable files as they were."""
    from pipeline import storage
    _, env, _ = s3
    _aws_env(monkeypatch, env)
    fs = _fs(env)
    out = f"s3://{BUCKET}/vanish/out"
    root = out.removeprefix("s3://")
    storage.configure({})

    def report(thumbs: dict[str, bytes]):
        def write(folder: Path) -> None:
            (folder / "report" / "thumbs").mkdir(parents=True)
            (folder / "report" / "thumbs.json").write_text(json.dumps(sorted(thumbs)))
            for name, data in thumbs.items():
                (folder / "report" / "thumbs" / name).write_bytes(data)
            (folder / "run.json").write_text("{}")
        return write
    storage.publish(out, "r1", report({"1.jpg": b"one", "2.jpg": b"two"}))
    with storage.last_generation(out, ("thumbs.json",)) as last:
        assert isinstance(last, storage.LastReport)
        assert json.loads((last.folder / "thumbs.json").read_text()) == ["1.jpg", "2.jpg"]
        assert last.carry("thumbs/1.jpg") and last.carry("thumbs/2.jpg") and not last.carry("thumbs/3.jpg")
        # a second run carries both, adds a third; the stable names it already holds are not copied
        storage.publish(out, "r2", report({"3.jpg": b"three"}), last=last)
    assert fs.cat_file(f"{root}/.dedupe/current") == b"gen-r2"
    for where in (root, f"{root}/.dedupe/gen-r2"):
        assert {p.rsplit("/", 1)[-1]: fs.cat_file(p) for p in fs.find(f"{where}/report/thumbs")} == \
            {"1.jpg": b"one", "2.jpg": b"two", "3.jpg": b"three"}
    with storage.last_generation(out, ("thumbs.json",)) as last:
        assert last.carry("thumbs/1.jpg")
        fs.rm_file(f"{root}/.dedupe/gen-r2/report/thumbs/1.jpg")  # gone while the run went on
        with pytest.raises(OSError, match="vanished .* run again"):
            storage.publish(out, "r3", report({}), last=last)
    assert fs.cat_file(f"{root}/.dedupe/current") == b"gen-r2"
    assert not fs.exists(f"{root}/.dedupe/gen-r3/report/thumbs.json")
    assert fs.cat_file(f"{root}/report/thumbs/1.jpg") == b"one"


def test_load_run_plan_and_report_on_a_run_in_the_bucket_and_apply_refuses_objects(s3, bucket, dataset, tmp_path,
                                                                            monkeypatch, capsys):
    """`load_run("s3://...")` reads the published generation (not the stable names, which another
    run may be copying over); `dedupe plan` on OUT in the bucket writes OUT/plan.parquet there (or
    --output); `apply` refuses a run on a store with a message, and nothing is touched; `dedupe
    report` publishes a new generation with the rebuilt report."""
    from pipeline.actions import make_plan
    from pipeline.cli import main
    from pipeline.results import load_run
    env, log_path, client, fs, prefix, data, out, args = _screen_on_bucket(s3, monkeypatch, dataset, "plan")
    assert _dedupe(data, *args) == 0
    root = out.removeprefix("s3://")
    images, pairs = _read_outputs(out, env)
    published = f"{root}/.dedupe/{fs.cat_file(f'{root}/.dedupe/current').decode()}"
    for name in ("images.parquet", "pairs.parquet", "run.json"):  # the stable names, not the generation
        fs.pipe_file(f"{root}/{name}", b"half-copied by another run")
    run = load_run(out + "/")
    assert run.out_dir == out and run.root == data
    assert run.manifest == json.loads(fs.cat_file(f"{published}/run.json"))
    got = run.images.sort_values("path").reset_index(drop=True)
    assert got["path"].tolist() == images["path"].tolist() and len(run.pairs) == len(pairs)
    assert got["abs_path"].tolist() == [f"{data}/{p}" for p in images["path"]]
    assert got["cluster_id"].tolist() == images["cluster_id"].tolist()
    clustered = got.set_index("path")["cluster_id"]
    assert clustered["edits/p0_exact_copy.jpg"] == clustered["originals/p0.jpg"]

    assert main(["plan", out, "--keep", "largest_file"]) == 0
    assert f"{out}/plan.parquet" in capsys.readouterr().out
    with fs.open(f"{root}/plan.parquet", "rb") as fh:
        stored = pd.read_parquet(fh)
    pd.testing.assert_frame_equal(stored, make_plan(run, "largest_file"), check_dtype=False)
    assert (stored["action"] == "remove").any()
    assert main(["plan", out, "--keep", "largest_file", "--output", str(tmp_path / "plan.parquet")]) == 0
    # a preferred folder given as its URL, like an absolute local folder
    for prefer in ("edits", f"{data}/edits/"):
        assert main(["plan", out, "--keep", "preferred_folder", "--prefer", prefer,
                     "--output", str(tmp_path / "preferred.csv")]) == 0
        kept = pd.read_csv(tmp_path / "preferred.csv").query("action == 'keep'")["path"]
        assert kept.str.startswith("edits/").all(), (prefer, kept.tolist())
    assert main(["plan", f"s3://{BUCKET}/plan/nothing", "--keep", "largest_file"]) == 2
    assert "not the output location of a finished run" in capsys.readouterr().err

    assert main(["apply", f"{out}/plan.parquet", "--action", "delete", "--execute"]) == 2
    assert "is on a store" in capsys.readouterr().err
    assert main(["apply", str(tmp_path / "plan.parquet"), "--action", "delete", "--execute"]) == 2
    assert "objects on a store" in capsys.readouterr().err
    assert not (tmp_path / "plan.parquet.log").exists() and not list(tmp_path.glob("*trash*"))

    # a report while a run holds OUT's lock: refused, naming the holder
    _foreign_lock(fs, f"{root}/.dedupe.lock")
    assert main(["report", out]) == 2
    assert "4242" in capsys.readouterr().err
    fs.rm_file(f"{root}/.dedupe.lock")

    # `dedupe report` on the store: a new generation with the run's files (the same bytes) and the
    # report made again, its thumbnails carried over on the server (no image read, no thumbnail
    # downloaded); the stable names follow it (the damaged images.parquet is whole again)
    old_gen = f"{root}/.dedupe/{fs.cat_file(f'{root}/.dedupe/current').decode()}"
    before = _report_objects(fs, f"{old_gen}/report")
    since = _log_lines(log_path)
    assert main(["report", out, "--set", "report.keep=newest"]) == 0
    assert "report/index.html" in capsys.readouterr().out
    images_read = _object_gets(log_path, since, prefix)
    report_read = _object_gets(log_path, since, f"{root.removeprefix(BUCKET + '/')}/.dedupe")
    new_gen = f"{root}/.dedupe/{fs.cat_file(f'{root}/.dedupe/current').decode()}"
    assert new_gen != old_gen and fs.exists(old_gen)  # (the previous generation is kept)
    for name in ("images.parquet", "pairs.parquet", "run.json"):
        assert fs.cat_file(f"{new_gen}/{name}") == fs.cat_file(f"{old_gen}/{name}") == fs.cat_file(f"{root}/{name}")
    after, stable = _report_objects(fs, f"{new_gen}/report"), _report_objects(fs, f"{root}/report")
    assert after == stable and "data.js" in after and b'"newest"' in after["data.js"]
    assert {n: b for n, b in after.items() if n.startswith("thumbs/")} == \
        {n: b for n, b in before.items() if n.startswith("thumbs/")}
    assert images_read == []  # no image read
    assert report_read and not [k for k in report_read if "/report/thumbs/" in k]
    assert load_run(out).manifest == run.manifest
    assert not fs.exists(f"{root}/.dedupe.lock")  # (the report's lock is let go)


def test_plan_report_query_and_load_run_open_the_store_with_the_options_of_a_config_file(
        s3, bucket, dataset, photo_paths, tmp_path, monkeypatch, capsys):
    """A user whose credentials and endpoint are in the nightly run's config file (storage.options),
    not in the environment, passes the same file (or --set storage.*) to plan, report and query,
    and the options to load_run; without them the store refuses, with exit 2 and a message."""
    from pipeline import storage
    from pipeline.cli import main
    from pipeline.results import load_run
    env, _, _, fs, _, data, out, args = _screen_on_bucket(s3, monkeypatch, dataset, "options")
    assert _dedupe(data, *args) == 0
    root = out.removeprefix("s3://")
    options = {"key": env["AWS_ACCESS_KEY_ID"], "secret": env["AWS_SECRET_ACCESS_KEY"],
               "endpoint_url": env["AWS_ENDPOINT_URL"]}
    config = tmp_path / "nightly.yaml"
    config.write_text(yaml.safe_dump({"storage": {"options": options}, "tiers": "screen"}))
    inline = "storage.options=" + json.dumps(options)  # (JSON is YAML)
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(key)  # only the config knows the way in now
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # (never the public cloud, even by mistake)
    import s3fs
    s3fs.S3FileSystem.clear_instance_cache()  # (as a new process: none opened with the environment's keys)
    try:
        assert main(["plan", out, "--keep", "largest_file"]) == 2
        assert "OUT" in capsys.readouterr().err
        assert main(["plan", out, "--keep", "largest_file", "--config", str(config)]) == 0
        assert f"{out}/plan.parquet" in capsys.readouterr().out
        assert fs.exists(f"{root}/plan.parquet")
        assert main(["plan", out, "--keep", "largest_file", "--set", inline, "--output", str(tmp_path / "p.csv")]) == 0
        assert (tmp_path / "p.csv").is_file()
        assert main(["plan", out, "--keep", "largest_file", "--set", "screen.max_distance=3"]) == 2
        assert "only storage.* settings apply to `plan`" in capsys.readouterr().err
        bad = tmp_path / "bad.yaml"
        bad.write_text("storage: {options: [1]}\n")
        assert main(["plan", out, "--keep", "largest_file", "--config", str(bad)]) == 2
        assert "expected a mapping" in capsys.readouterr().err

        run = load_run(out, storage_options=options)
        assert run.manifest == json.loads(fs.cat_file(f"{root}/run.json")) and len(run.images) == run.manifest["counts"]["files"]
        current = fs.cat_file(f"{root}/.dedupe/current")
        assert main(["report", out, "--set", "report.keep=newest"]) == 2
        assert main(["report", out, "--config", str(config), "--set", "report.keep=newest"]) == 0
        assert "report/index.html" in capsys.readouterr().out
        assert fs.cat_file(f"{root}/.dedupe/current") != current
        assert b'"newest"' in fs.cat_file(f"{root}/report/data.js")
        assert main(["report", out, "--set", inline, "--set", "report.keep=oldest"]) == 0
        assert b'"oldest"' in fs.cat_file(f"{root}/report/data.js")
        # the file's report section applies too (before --set)
        config.write_text(yaml.safe_dump({"storage": {"options": options}, "report": {"keep": "shortest_path"}}))
        assert main(["report", out, "--config", str(config)]) == 0
        assert b'"shortest_path"' in fs.cat_file(f"{root}/report/data.js")
        assert main(["report", out, "--config", str(config), "--set", "report.keep=newest"]) == 0
        assert b'"newest"' in fs.cat_file(f"{root}/report/data.js")
        assert main(["report", out, "--config", str(config), "--set", "decide.cosine_threshold=0.5"]) == 2
        assert "only report.* and storage.* settings apply to `report`" in capsys.readouterr().err

        image = next(p for p in sorted(dataset.rglob("*")) if p.name == "p0_exact_copy.jpg")
        catalog = f"{out}/catalog"
        assert main(["query", str(image), "--catalog", catalog]) == 2
        err = capsys.readouterr().err  # the store refused: not "no catalog" (which says to build one)
        assert "cannot read the catalog" in err and "no catalog" not in err, err
        wrong = "storage.options=" + json.dumps(dict(options, secret="not-the-secret"))
        assert main(["query", str(image), "--catalog", catalog, "--set", wrong]) == 2
        assert "access denied" in capsys.readouterr().err
        assert main(["query", str(image), "--catalog", catalog, "--config", str(config),
                     "--output", str(tmp_path / "q.csv")]) == 0
        found = pd.read_csv(tmp_path / "q.csv")
        assert "originals/p0.jpg" in set(found.loc[found["is_duplicate"], "path"])
    finally:
        storage.configure({})
        s3fs.S3FileSystem.clear_instance_cache()  # (those opened without credentials, for the next tests)


# ---------------------------------------------------------------------------------------------
# ETags: a rewrite that keeps the size and the last-modified time (1 s on S3) is still seen


def test_content_tags_from_each_backends_listing_entry():
    """What tells two objects' bytes equal: S3's ETag, GCS's md5Hash, Azure's Content-MD5 (as
    adlfs lists it: the SDK's ContentSettings); never Azure's or GCS's etag, new at every write."""
    import base64
    ContentSettings = pytest.importorskip("azure.storage.blob", reason="the azure extra is not installed").ContentSettings
    from pipeline import storage
    digest = hashlib.md5(b"thumb").digest()
    assert storage.content_tag({"ETag": '"900150983cd24fb0d6963f7d28e17f72"'}) == "etag:900150983cd24fb0d6963f7d28e17f72"
    assert storage.content_tag({"md5Hash": "kAFQmDzST7DWlj99KOF/cg==", "etag": "CJ3w"}) == "md5:kAFQmDzST7DWlj99KOF/cg=="
    azure = {"etag": '"0x8DB1F2A3C4D5E6F"', "content_settings": ContentSettings(content_md5=bytearray(digest))}
    assert storage.content_tag(azure) == "md5:" + base64.b64encode(digest).decode()
    assert storage.content_tag({"etag": '"0x8DB"', "content_settings": {"content_md5": digest}}) == \
        storage.content_tag(azure)
    # a blob put in blocks has no Content-MD5: no tag (it is copied), never its etag
    assert storage.content_tag({"etag": '"0x8DB"', "content_settings": ContentSettings()}) is None
    assert storage.content_tag({"etag": "CJ3w"}) is None


def test_an_azure_copy_that_answers_pending_is_waited_for(monkeypatch):
    """Azure's Copy Blob may answer "pending" and finish later: `server_copy` returns only once
    every copy has ended, fails on a copy that failed, and names a missing source. (Azurite always
    answers "success", so the service here is a stand-in for the SDK's blob clients.)"""
    import asyncio
    ResourceNotFoundError = pytest.importorskip("azure.core.exceptions",
                                                reason="the azure extra is not installed").ResourceNotFoundError
    from pipeline import storage
    monkeypatch.setattr(storage, "AZURE_COPY_POLL_S", 0.001)
    polls: dict[str, int] = {}

    class Blob:
        def __init__(self, name):
            self.name, self.url = name, f"https://account.blob.core.windows.net/c/{name}"

        async def start_copy_from_url(self, url):
            source = url.rsplit("/", 1)[-1]
            if source == "missing":
                raise ResourceNotFoundError("The specified blob does not exist.")
            polls[self.name] = 0
            return {"copy_status": "pending"}

        async def get_blob_properties(self):
            polls[self.name] += 1
            done = polls[self.name] >= 3
            status = ("failed" if self.name == "broken" else "success") if done else "pending"
            return type("Props", (), {"copy": type("Copy", (), {"status": status})()})()

    class Service:
        def get_container_client(self, container):
            return type("Container", (), {"get_blob_client": staticmethod(Blob)})()

    class FakeAzure:
        protocol = ("abfs", "az", "abfss")
        service_client = Service()

        def __init__(self):
            self.loop = asyncio.new_event_loop()
            import threading
            threading.Thread(target=self.loop.run_forever, daemon=True).start()

        def split_path(self, path):
            container, name = path.split("/", 1)
            return container, name, None

        def invalidate_cache(self, path=None):
            pass

    fs = FakeAzure()
    try:
        storage.server_copy(fs, ["c/a", "c/b"], ["c/x", "c/y"])
        assert polls == {"x": 3, "y": 3}  # each polled until it ended
        with pytest.raises(OSError, match="ended 'failed'"):
            storage.server_copy(fs, ["c/a"], ["c/broken"])
        with pytest.raises(FileNotFoundError, match="c/missing"):
            storage.server_copy(fs, ["c/missing"], ["c/z"])
    finally:
        fs.loop.call_soon_threadsafe(fs.loop.stop)


def test_etags_are_read_from_each_backends_listing_entry():
    """What s3fs, gcsfs and adlfs list (the keys and quoting their emulators answered with),
    normalised; memory:// lists none."""
    from pipeline import run, scan, storage
    from pipeline.config import ScanConfig
    assert storage._etag({"ETag": '"900150983cd24fb0d6963f7d28e17f72"'}) == "900150983cd24fb0d6963f7d28e17f72"
    assert storage._etag({"ETag": '"3858f62230ac3c915f300c664312c11f-2"'}) == "3858f62230ac3c915f300c664312c11f-2"
    assert storage._etag({"etag": "kAFQmDzST7DWlj99KOF/cg==", "md5Hash": "x"}) == "kAFQmDzST7DWlj99KOF/cg=="
    assert storage._etag({"etag": '"0x8DB1F2A3C4D5E6F"'}) == "0x8DB1F2A3C4D5E6F"
    assert storage._etag({"name": "b/x.jpg", "size": 3}) is None and storage._etag({"ETag": '""'}) is None

    import fsspec
    fsspec.filesystem("memory").pipe_file("/etag-mem/x.jpg", b"\xff\xd8\xff" + bytes(40))
    storage.configure({})
    [entry] = list(storage.iter_objects("memory://etag-mem", ScanConfig()))
    assert entry.path == "x.jpg" and entry.etag is None

    tagged = scan.FileEntry("x.jpg", "s3://b/x.jpg", 43, 1.0, None, entry.mtime_ns, "aaa")
    assert run.etag_differs("bbb", tagged)
    assert not run.etag_differs("aaa", tagged)
    assert not run.etag_differs(None, tagged)  # a catalog written before ETags were kept
    assert not run.etag_differs("bbb", entry)  # a listing without them


def test_iter_objects_gives_the_s3_etag_and_changed_since_sees_a_rewrite_within_the_second(s3, monkeypatch):
    """moto's listing carries each object's ETag (the MD5 of a single-part upload); two PUTs of
    the same size within one second keep size and last-modified time, so only the ETag tells
    the second from the first."""
    import hashlib
    from pipeline import storage
    from pipeline.config import ScanConfig
    _, env, _ = s3
    _aws_env(monkeypatch, env)
    fs = _fs(env)
    fs.mkdir(f"{BUCKET}-etag")
    first, second = b"\xff\xd8\xff" + b"a" * 61, b"\xff\xd8\xff" + b"b" * 61
    fs.pipe_file(f"{BUCKET}-etag/d/y.jpg", first)
    storage.configure({})
    for _ in range(20):  # the two PUTs may straddle a second boundary: then try again
        fs.pipe_file(f"{BUCKET}-etag/d/x.jpg", first)
        [x, y] = list(storage.iter_objects(f"s3://{BUCKET}-etag/d", ScanConfig()))
        fs.pipe_file(f"{BUCKET}-etag/d/x.jpg", second)
        [x2, _] = list(storage.iter_objects(f"s3://{BUCKET}-etag/d", ScanConfig()))
        if x2.mtime_ns == x.mtime_ns:
            break
    else:
        pytest.fail("20 pairs of PUTs never fell within one second")
    assert (x.path, y.path) == ("x.jpg", "y.jpg")
    assert x.etag == y.etag == hashlib.md5(first).hexdigest()
    assert x2.etag == hashlib.md5(second).hexdigest() and x2.bytes == x.bytes
    url = [x.abs_path]
    # size and last-modified time alone miss the rewrite; with the ETag it is seen
    assert storage.changed_since(url, [x.bytes], [x.mtime]) == [False]
    assert storage.changed_since(url, [x.bytes], [x.mtime], [x.etag]) == [True]
    assert storage.changed_since(url, [x2.bytes], [x2.mtime], [x2.etag]) == [False]
    assert storage.changed_since(url, [x.bytes], [x.mtime], [None]) == [False]  # no tag recorded: as before


def test_an_object_rewritten_within_its_second_during_the_run_is_marked_changed(s3, bucket, dataset, tmp_path,
                                                                               monkeypatch):
    """The run lists an object, then it is rewritten (same size, other bytes) within the second of
    its first PUT: the end-of-run check finds the listing's size and last-modified time unchanged
    but not its ETag, and marks the file as changed during the run instead of deciding on it."""
    from pipeline import cli, decide, storage
    _, env, _ = s3
    _aws_env(monkeypatch, env)
    fs = _fs(env)
    prefix = f"{BUCKET}/etag-during"
    photo = (dataset / "originals" / "p0.jpg").read_bytes()
    fs.pipe_file(f"{prefix}/a.jpg", photo)
    listed, seen = storage.iter_objects, []

    def put_list_then_rewrite(url, cfg, skip=()):
        fs.pipe_file(f"{prefix}/b.jpg", photo)  # the first PUT, just before the listing
        for entry in listed(url, cfg, skip):
            if entry.path == "b.jpg":
                fs.pipe_file(f"{prefix}/b.jpg", _other_bytes_same_size(photo))
                seen.append(storage._mtime(fs.info(f"{prefix}/b.jpg", refresh=True)) == entry.mtime)
            yield entry

    monkeypatch.setattr(storage, "iter_objects", put_list_then_rewrite)
    for attempt in range(10):  # the two PUTs may straddle a second boundary: then run again
        out = tmp_path / f"out{attempt}"
        assert cli.main(["dedupe", f"s3://{prefix}", "--out", str(out), "--tiers", "screen", "--scheduler",
                         "sync", "--quiet", "--no-catalog"]) == 0
        if seen[-1]:
            break
    else:
        pytest.fail("10 rewrites never fell within the second of the first PUT")
    images = pd.read_parquet(out / "images.parquet").set_index("path")
    assert images.loc["b.jpg", "error"] == decide.CHANGED_ERROR and pd.isna(images.loc["a.jpg", "error"])
    assert json.loads((out / "run.json").read_text())["counts"]["changed_during_run"] == 1


# lists DATA, copies its first object to a scratch prefix, rewrites that copy with other bytes of
# the same size: the ETags of each listing, as JSON (run with a backend's env, in its own process)
_LIST_AND_REWRITE = """
import json, sys
from pipeline import storage
from pipeline.config import ScanConfig
data, scratch = sys.argv[1], sys.argv[2]
storage.configure(json.loads(sys.argv[3]))
fs, root = storage.filesystem(scratch)

def etags(url):
    return {e.path: e.etag for e in storage.iter_objects(url, ScanConfig())}

listed = etags(data)
body = storage.read_bytes(storage.join(data, sorted(listed)[0]))
fs.pipe_file(root + "/x.jpg", body)
before = etags(scratch)
fs.pipe_file(root + "/x.jpg", body[:-1] + bytes([body[-1] ^ 1]))
print(json.dumps({"data": listed, "before": before, "after": etags(scratch)}))
"""


def _etags_listed(env: dict, data: str, scratch: str, options: dict) -> dict:
    done = subprocess.run([sys.executable, "-c", _LIST_AND_REWRITE, data, scratch, json.dumps(options)], env=env,
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _check_listed_etags(got: dict) -> None:
    assert len(got["data"]) > N_PHOTOS and all(isinstance(t, str) and t for t in got["data"].values()), got
    assert not any(t.startswith('"') or t.endswith('"') for t in got["data"].values())  # normalised
    assert list(got["before"]) == list(got["after"]) == ["x.jpg"]
    assert got["before"]["x.jpg"] != got["after"]["x.jpg"], got


def test_a_gcs_listing_carries_etags_that_change_on_a_rewrite(gcs):
    """iter_objects gives every object its ETag on gcp-storage-emulator, and a same-size rewrite
    changes it."""
    _check_listed_etags(_etags_listed(gcs, "gs://gphotos/data", "gs://gphotos/etag",
                                      {"token": "anon", "project": "test"}))


def test_an_azure_listing_carries_etags_that_change_on_a_rewrite(azure):
    """The same on Azurite (Azure's last-modified time has 1 s resolution, as S3's)."""
    _check_listed_etags(_etags_listed(azure, "az://aphotos/data", "az://aphotos/etag", {}))


def _edit_catalog_images(fs, catalog: str, change) -> None:
    """Replace the images table of the catalog at `catalog` (bucket/prefix) by change(table),
    named in its manifest with its size and sha256 as a commit names a table (so it is trusted)."""
    import hashlib
    import io
    manifest = json.loads(fs.cat_file(f"{catalog}/manifest.json"))
    entry = manifest["tables"]["images"]
    table = change(pd.read_parquet(io.BytesIO(fs.cat_file(f"{catalog}/{entry['file']}"))))
    buf = io.BytesIO()
    table.to_parquet(buf, index=False)
    data = buf.getvalue()
    rel = entry["file"].replace(".parquet", "-edited.parquet")
    fs.pipe_file(f"{catalog}/{rel}", data)
    manifest["tables"]["images"] = {"file": rel, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    fs.pipe_file(f"{catalog}/manifest.json", json.dumps(manifest).encode("utf-8"))


def _other_bytes_same_size(data: bytes) -> bytes:
    """A JPEG's first quantisation step changed by one: other bytes, the same size, still a whole
    JPEG (a bit flipped in its compressed data is damage, an error row of its own)."""
    edited = bytearray(data)
    i = edited.find(b"\xff\xdb") + 5  # (marker, length, precision and table id: its first step)
    edited[i] = edited[i] + 1 if edited[i] < 0xFE else edited[i] - 1
    return bytes(edited)


def test_a_same_size_rewrite_within_the_second_is_screened_again_by_its_etag(s3, bucket, dataset, tmp_path,
                                                                            monkeypatch):
    """The catalog keeps each object's ETag. moto cannot set an object's last-modified time, so
    the same-second case is made on the catalog's side: after a same-size rewrite, the record's
    mtime_ns is set to the new listing's (what a rewrite within the recorded second leaves). Then
    the re-run reads that object, and only that one, because its ETag differs (`changed_etag`),
    and its outputs equal a run from scratch. A catalog written before ETags were kept (no etag
    column) still reuses every unchanged object and gains their ETags; with no ETag recorded the
    same-second rewrite is missed, which is the limit the ETag removes."""
    import hashlib
    from pipeline import storage
    from pipeline.config import ScanConfig
    env, log_path, client, fs, prefix, data, out, args = _screen_on_bucket(s3, monkeypatch, dataset, "etag")
    cat = f"{BUCKET}/etag/out/catalog"
    assert _dedupe(data, *args) == 0
    storage.configure({})

    def listing() -> dict:
        return {e.path: e for e in storage.iter_objects(data, ScanConfig())}

    def catalog_images() -> pd.DataFrame:
        manifest = json.loads(fs.cat_file(f"{cat}/manifest.json"))
        import io
        return pd.read_parquet(io.BytesIO(fs.cat_file(f"{cat}/{manifest['tables']['images']['file']}")))

    listed = listing()
    stored = catalog_images().set_index("path")
    assert stored["etag"].notna().all()
    assert all(stored.loc[p, "etag"] == e.etag for p, e in listed.items())

    # a catalog from before ETags: every unchanged object reused, none read, the ETags added
    _edit_catalog_images(fs, cat, lambda t: t.drop(columns=["etag"]))
    since = _log_lines(log_path)
    assert _dedupe(data, *args) == 0
    assert set(_object_gets(log_path, since, prefix)) <= {"edits/notes.txt"}  # (a sniff of its head)
    reuse = _run_json(fs, out)["reuse"]["screen"]
    assert reuse["screened"] == 0 and reuse["reused"] == len(listed), reuse
    stored = catalog_images().set_index("path")
    assert all(stored.loc[p, "etag"] == e.etag for p, e in listed.items())

    # a same-size rewrite, its record's mtime_ns made the new listing's: found by the ETag alone
    target = f"originals/{next((dataset / 'originals').glob('p2.*')).name}"
    new = _other_bytes_same_size(client.get_object(Bucket=BUCKET, Key=f"{prefix}/{target}")["Body"].read())
    fs.pipe_file(f"{BUCKET}/{prefix}/{target}", new)
    now = listing()[target]
    assert now.etag != stored.loc[target, "etag"] and now.bytes == stored.loc[target, "bytes"]

    def same_second(table: pd.DataFrame) -> pd.DataFrame:
        table.loc[table["path"] == target, "mtime_ns"] = now.mtime_ns
        return table
    _edit_catalog_images(fs, cat, same_second)
    since = _log_lines(log_path)
    assert _dedupe(data, *args) == 0
    assert set(_object_gets(log_path, since, prefix)) - {"edits/notes.txt"} == {target}
    reuse = _run_json(fs, out)["reuse"]["screen"]
    assert reuse["why_screened"] == {"changed_etag": 1} and reuse["screened"] == 1, reuse
    images = _read_outputs(out, env)[0].set_index("path")
    assert images.loc[target, "sha256"] == hashlib.sha256(new).hexdigest() and pd.isna(images.loc[target, "error"])
    assert _dedupe(data, "--out", str(tmp_path / "scratch"), "--tiers", "screen", "--scheduler", "sync",
                   "--quiet", "--no-catalog") == 0
    _assert_same_outputs(_read_outputs(out, env), _read_outputs(tmp_path / "scratch", env))

    # the same case with no ETag recorded is missed (the old limit): the stale record is reused
    again = _other_bytes_same_size(new)
    fs.pipe_file(f"{BUCKET}/{prefix}/{target}", again)
    now = listing()[target]
    _edit_catalog_images(fs, cat, lambda t: same_second(t).drop(columns=["etag"]))
    assert _dedupe(data, *args) == 0
    assert _run_json(fs, out)["reuse"]["screen"]["screened"] == 0
    assert _read_outputs(out, env)[0].set_index("path").loc[target, "sha256"] == hashlib.sha256(new).hexdigest()


@pytest.mark.slow
def test_high_recall_mode_with_the_catalog_in_the_bucket_equals_a_run_from_scratch(s3, bucket, tmp_path, monkeypatch):
    """screen.mode hash+embedding: the screen embeddings are catalog features in the bucket and
    the kNN reads them back from there (storage.options reach that read too)."""
    _, env, _ = s3
    _aws_env(monkeypatch, env)
    monkeypatch.delenv("AWS_ENDPOINT_URL")  # the endpoint from storage.options only
    fs = _fs(env)
    out = f"s3://{BUCKET}/high-recall/out"
    args = ["--preset", "high-recall", "--scheduler", "sync", "--quiet",
            "--set", f"storage.options={{endpoint_url: '{env['AWS_ENDPOINT_URL']}'}}"]
    assert _dedupe(bucket, "--out", out, *args) == 0
    assert _dedupe(bucket, "--out", out, *args) == 0  # nothing changed: every embedding from the catalog
    reuse = _run_json(fs, out)["reuse"]
    assert reuse["screen_embed"]["embeddings_computed"] == 0 and reuse["screen_embed"]["embeddings_reused"] > 0
    assert _dedupe(bucket, "--out", str(tmp_path / "scratch"), "--no-catalog", *args) == 0
    _assert_same_outputs(_read_outputs(out, env), _read_outputs(tmp_path / "scratch", env))


def test_odd_keys_one_objects_url_as_data_and_empty_named_folders(s3, monkeypatch, caplog, tmp_path):
    """A key that is also a prefix (g.jpg beside g.jpg/x.jpg) is listed twice by the store; the
    prefix's entry no longer makes the object "changed" at every run. DATA given as one object's
    URL is refused, exit 2 (the run listed nothing under it and published an empty OUT, emptying
    the catalog). Objects under an empty-named folder (a//b.jpg), which the listing cannot reach,
    are named in a warning, not left out in silence. A key holding "?versionId=", which the S3
    client reads as a version, is an error row saying so (it was "no such object")."""
    import logging
    from pipeline import storage
    from pipeline.config import ScanConfig
    _, env, _ = s3
    _aws_env(monkeypatch, env)
    fs = _fs(env)
    b = f"{BUCKET}-odd"
    fs.mkdir(b)
    jpeg = b"\xff\xd8\xff" + b"a" * 61
    for key in ("d/g.jpg", "d/g.jpg/x.jpg", "d/h.jpg", "d//e.jpg"):
        fs.pipe_file(f"{b}/{key}", jpeg)
    _s3_client(env).put_object(Bucket=b, Key="d/v?versionId=2.jpg", Body=jpeg)  # (s3fs cannot name it)
    storage.configure({})
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        listed = list(storage.iter_objects(f"s3://{b}/d", ScanConfig()))
    assert sorted(e.path for e in listed) == ["g.jpg", "g.jpg/x.jpg", "h.jpg", "v?versionId=2.jpg"]
    assert "takes for an object version" in next(e.error for e in listed if "versionId" in e.path)
    assert "empty-named folder" in caplog.text
    g = next(e for e in listed if e.path == "g.jpg")
    assert storage.changed_since([g.abs_path], [g.bytes], [g.mtime], [g.etag]) == [False]
    assert _dedupe(f"s3://{b}/d/h.jpg", "--out", f"s3://{b}/out", "--tiers", "screen", "--scheduler", "sync",
                   "--quiet") == 2
    assert not fs.exists(f"{b}/out")


def test_a_publish_that_fails_after_its_commit_point_says_so(s3, monkeypatch, caplog, photo_paths):
    """The copies to OUT's stable names come after the commit point (`current`): a failure there
    no longer says "the previous outputs are untouched" (readers through `current` already get
    the new run); it says what was published and what may be mixed."""
    import logging
    from pipeline import storage
    _, env, _ = s3
    _aws_env(monkeypatch, env)
    fs = _fs(env)
    b = f"{BUCKET}-commit"
    fs.mkdir(b)
    for p in photo_paths[:3]:
        fs.put_file(str(p), f"{b}/d/{p.name}")

    def fails(*args, **kwargs):
        raise OSError("planted: a copy to a stable name failed")
    monkeypatch.setattr(storage, "_copy_to_stable_names", fails)
    with caplog.at_level(logging.ERROR, logger="pipeline"):
        assert _dedupe(f"s3://{b}/d", "--out", f"s3://{b}/out", "--tiers", "screen", "--scheduler", "sync",
                       "--quiet") == 1
    assert "the new outputs were published" in caplog.text and "untouched" not in caplog.text
    current = fs.cat_file(f"{b}/out/.dedupe/current").decode()
    assert fs.exists(f"{b}/out/.dedupe/{current}/run.json")


def test_secrets_file_urls_and_one_store_by_two_names_without_a_server():
    """storage.redacted masks adlfs's connection string and any value that carries a key or a SAS
    signature; a lock's command line masks secret --set storage.options values (the key was in
    OUT/.dedupe.lock and in another run's "in use by" message); file:// URLs decode as URLs
    (Path.as_uri()'s %20, file://localhost/); a local-only option refuses a store URL; s3:// and
    s3a:// name one place, so OUT under DATA is known whatever the spelling."""
    from pipeline.actions import PlanError
    from pipeline.config import ConfigError
    assert storage.redacted({"connection_string": "DefaultEndpointsProtocol=http;AccountKey=abc;",
                             "account_name": "acct", "client_kwargs": {"endpoint_url": "http://h/x?sv=1&sig=abc"},
                             "anon": False}) == {"connection_string": "***", "account_name": "acct",
                                                 "client_kwargs": {"endpoint_url": "***"}, "anon": False}
    command = storage.command_line(["dedupe", "dedupe", "az://c/d", "--set", "storage.options.account_key=abc",
                                    "--set", "storage.options.conn_str=BlobEndpoint=x;AccountKey=abc",
                                    "--set", "screen.max_distance=8", "--set", "storage.options.anon=false"])
    assert "abc" not in command and "storage.options.account_key=***" in command
    assert "screen.max_distance=8" in command and "storage.options.anon=false" in command
    # (the README's form, a mapping, and --set=...)
    command = storage.command_line(["dedupe", "--set", 'storage.options={"key": "AKIA", "secret": "abc"}',
                                    "--set=storage.options.account_key=abc"])
    assert "abc" not in command and "AKIA" not in command and "--set=storage.options.account_key=***" in command
    assert storage.local_form("file:///tmp/my%20photos") == "/tmp/my photos"
    assert storage.local_form("file://localhost/tmp/x") == "/tmp/x" and storage.local_form("/tmp/x") == "/tmp/x"
    assert storage.local_form("file:/tmp/x") == "/tmp/x"  # (one slash: a file URL too, not ./file:/tmp/x)
    assert storage.local_form("file:///tmp/caf%E9") == os.fsdecode(b"/tmp/caf\xe9")  # (not UTF-8: its bytes)
    with pytest.raises(ConfigError, match="names a file on another host"):  # (was ./nas/share)
        storage.local_form("file://nas/share")
    with pytest.raises(PlanError, match="--to 'az://c/backup': a local path is needed"):
        storage.local_path("az://c/backup", "--to", PlanError)
    assert storage.local_path("file:///tmp/b%23", "--to", PlanError) == "/tmp/b#"
    assert storage.location("s3://bucket/data/") == storage.location("s3a://bucket/data")
    assert run_mod.inside("s3://bucket/data", ["s3a://bucket/data/out", "s3://bucket/other", "s3a://bucket/data"]) \
        == ["s3a://bucket/data/out"]


def test_an_azure_store_with_no_credentials_says_so(monkeypatch):
    """adlfs with no account or key refuses to start with a ValueError: the message said only that
    storage.options were not accepted, with none given."""
    from pipeline.config import ConfigError
    pytest.importorskip("adlfs", reason="adlfs is not installed (make install installs the test extras)")
    for key in [k for k in os.environ if k.startswith("AZURE_")]:
        monkeypatch.delenv(key)
    with pytest.raises(ConfigError, match="or it found no credentials .*AZURE_STORAGE_CONNECTION_STRING"):
        storage.filesystem("az://photos/data", {})


def test_local_only_options_refuse_store_urls_and_decode_file_urls(tmp_path, capsys):
    """`apply --to az://...` was a dry run into ./az:/...; `--to file:///x` moved files into
    ./file:/x; `query --output az://...` said its folder did not exist."""
    from pipeline.cli import main
    plan = tmp_path / "plan.parquet"
    pd.DataFrame({"cluster_id": pd.Series([], dtype="int64")}).to_parquet(plan)
    assert main(["apply", str(plan), "--action", "move", "--to", "az://photos/backup"]) == 2
    assert "a local path is needed here" in capsys.readouterr().err
    assert main(["query", str(tmp_path / "x.jpg"), "--catalog", str(tmp_path), "--output", "az://c/x.csv"]) == 2
    assert "--output 'az://c/x.csv': a local path is needed here" in capsys.readouterr().err


def test_a_run_on_the_store_leaves_what_it_did_not_make_in_out_alone(s3, bucket, monkeypatch, dataset, capsys):
    """OUT on the store holding the user's report/ objects: publishing overwrote the stable names
    and removed report/ objects the new report does not have. And only a run's work prefixes (its
    mark, or a tier's folders only) are removed as a killed run's."""
    env, _, client, fs, prefix, data, out, args = _screen_on_bucket(s3, monkeypatch, dataset, "foreign")
    root = out.split("://", 1)[1]
    fs.pipe_file(f"{root}/report/mine.jpg", b"the user's")
    assert _dedupe(data, *args) == 2
    assert "already holds report" in capsys.readouterr().err
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.find(root)) == ["mine.jpg"]  # (no lock object either)
    fs.rm(f"{root}/report/mine.jpg")
    fs.pipe_file(f"{root}/_work-2019/x.jpg", b"the user's")
    fs.pipe_file(f"{root}/_work-123/orb/part-000000.parquet", b"a killed run's")
    fs.pipe_file(f"{root}/_work-124/.dedupe-work", b"124 host")
    fs.pipe_file(f"{root}/_work-124/embed/part-000000.parquet", b"a killed run's")
    assert _dedupe(data, *args) == 0
    fs.invalidate_cache()
    left = {p.split(f"{root}/", 1)[1].split("/", 1)[0] for p in fs.find(root)}
    assert "_work-2019" in left and not {"_work-123", "_work-124"} & left
    assert fs.cat_file(f"{root}/_work-2019/x.jpg") == b"the user's"
    assert _dedupe(data, *args) == 0  # (a run's OUT: its own outputs replaced)
