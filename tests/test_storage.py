"""DATA and OUT on object storage: a real S3-compatible server (moto's server mode) on 127.0.0.1,
started and stopped here, with credentials checked (IAM auth on).

The end-to-end test runs the whole cascade on images in a bucket with an external `dask scheduler`
and two `dask worker` processes, each in its own empty folder (no shared local disk: the feature
files go to the bucket too), and compares the outputs read back from the bucket with a local run
on the same files. Nothing here talks to anything but 127.0.0.1.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    """moto_server on 127.0.0.1 with auth on; yields (endpoint, env with a valid key for it)."""
    if not (BIN / "moto_server").exists():
        pytest.skip("moto[server] is not installed (make install installs the test extras)")
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    # the first 3 requests (the IAM set-up below) are not checked; every later one is
    server_env = dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT="3", AWS_ACCESS_KEY_ID="setup",
                      AWS_SECRET_ACCESS_KEY="setup", AWS_DEFAULT_REGION="us-east-1")
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "wb")
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
        yield endpoint, env
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
    _, env = s3
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


@pytest.mark.slow
def test_cascade_on_a_bucket_with_remote_workers_equals_a_local_run(s3, bucket, dataset, models_dir, tmp_path):
    _, env = s3
    driver = tmp_path / "driver"
    driver.mkdir()
    env = dict(env, KERAS_HOME=str(_keras_home(models_dir, driver / "keras")))
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    procs = [subprocess.Popen([str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port),
                               "--dashboard-address", ":0"], env=env, cwd=driver,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    worker_dirs = []
    for n in (1, 2):  # each worker: its own empty folder and its own Keras cache, no shared disk
        home = tmp_path / f"worker{n}"
        cwd = home / "cwd"
        cwd.mkdir(parents=True)
        worker_dirs.append(cwd)
        wenv = dict(env, KERAS_HOME=str(_keras_home(models_dir, home / "keras")))
        procs.append(subprocess.Popen([str(BIN / "dask"), "worker", address, "--nworkers", "1", "--nthreads", "1",
                                       "--host", "127.0.0.1", "--dashboard-address", ":0",
                                       "--local-directory", str(cwd), "--name", f"w{n}"], env=wenv, cwd=cwd,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    try:
        from distributed import Client
        with Client(address, timeout="60s") as client:
            client.wait_for_workers(2, timeout=120)
        out = f"s3://{BUCKET}/runs/first"
        result = _run([bucket, "--out", out, "--scheduler", address, "--quiet", *TIERS], env, driver)
        assert result.returncode == 0, result.stderr[-4000:]
        local_out = tmp_path / "local-out"
        result = _run([str(dataset), "--out", str(local_out), "--scheduler", "sync", "--no-catalog", "--quiet",
                       *TIERS], env, driver)
        assert result.returncode == 0, result.stderr[-4000:]
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            proc.wait(60)

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
        import hashlib
        assert hashlib.sha256(fs.cat_file(f"{root}/{name}")).hexdigest() == digest, name
    assert fs.exists(f"{root}/report/index.html")
    # the lock and the work prefix (the workers' feature files) are gone; nothing was written locally
    left = [p.rsplit("/", 1)[-1] for p in fs.ls(root, refresh=True)]
    assert ".dedupe.lock" not in left and not [p for p in left if p.startswith("_work-")]
    for cwd in worker_dirs:
        assert not list(cwd.rglob("*.parquet")), cwd
    assert not list(driver.rglob("*.parquet"))


def test_bad_credentials_and_missing_bucket_are_usage_errors(s3, bucket, tmp_path):
    _, env = s3
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
    _, env = s3
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
    _, env = s3
    for k, v in env.items():
        if k.startswith("AWS_"):
            monkeypatch.setenv(k, v)
    fs = _fs(env)
    prefix = f"{BUCKET}/vanish"
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        fs.pipe_file(f"{prefix}/{name}", (dataset / "originals" / "p0.jpg").read_bytes())
    from pipeline import cli, storage
    listed = storage.iter_objects

    def listing_then_delete(url, cfg):
        for entry in listed(url, cfg):
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
        ([str(data), "--out", "gs://bucket/out"], "backend is not installed"),
        ([str(data), "--out", "s3://bucket/out", "--set", "storage.options={no_such_option: 1, endpoint_url: 'http://127.0.0.1:9', key: k, secret: s}"],
         "storage.options are not accepted"),
        ([str(data), "--out", str(tmp_path / "o"), "--catalog", "s3://bucket/catalog"],
         "a catalog on object storage is not supported yet"),
        ([str(data), "--out", str(tmp_path / "o"), "--set", "storage.options=[1]"], "expected a mapping"),
    ]
    for args, message in cases:
        import contextlib
        import io
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
