"""Incremental runs with DATA, OUT and the catalog in an S3 bucket: a re-run after a small change
vs a run from scratch on the same bucket, in the same benchmark run.

The store is moto's S3 server (`moto[server]`, installed by `make install`) on 127.0.0.1, started
and stopped here, behind bench/moto_counting.py, which logs each request with the bytes it returned.
With no latency the seconds show the work saved on this machine, not what a real bucket's round
trips would add; `--latency-ms` delays each response by that much. The requests and the bytes GET
are counted from the server's own log, which is what a store bills and what crosses the network.

The data: the real photos plus --per-source seeded transformed copies of each (bench/end_to_end.py's
generator), uploaded once. Steps, each through the real CLI (default scheduler):

1. a first run into s3://bench/out (its catalog: s3://bench/out/catalog);
2. add 1 % new objects (resized, re-encoded copies: new content) and delete 0.5 %;
3. the incremental run into s3://bench/out, then a run from scratch (--no-catalog) into
   s3://bench/scratch on the same objects: outputs checked equal (pairs.parquet, images.parquet;
   floats within 1e-5);
4. an unchanged re-run into s3://bench/out (listing, catalog, publish: the fixed cost on a store).

    python -m bench.storage_catalog [--per-source 2] [--latency-ms 0] [--bench-dir /tmp/dedupe-bench] [--out docs/benchmarks.md]
"""
from __future__ import annotations

import argparse
import io
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pandas as pd
from PIL import Image

from bench import end_to_end, transforms
from bench.report import stamp, table, update_section

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
BUCKET = "bench"
FLOAT_ATOL = 1e-5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto(log_path: Path, latency_ms: float = 0.0) -> tuple[subprocess.Popen, str]:
    if not (BIN / "moto_server").exists():
        raise SystemExit("moto_server is missing: make install installs moto[server]")
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = open(log_path, "wb")
    # moto's server with each response's bytes in its log (bench/moto_counting.py)
    proc = subprocess.Popen([sys.executable, "-m", "bench.moto_counting", str(port), str(latency_ms)], cwd=REPO,
                            stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1)
            return proc, endpoint
        except OSError:
            time.sleep(0.2)
    proc.terminate()
    raise SystemExit("moto_server did not start")


def object_gets(log_path: Path, since: int, prefix: str) -> int:
    """GETs of objects under `prefix` (not listings) in the server's log after line `since`."""
    return get_bytes(log_path, since, prefix)[0]


def out_requests(log_path: Path, since: int, prefix: str) -> dict[str, int]:
    """Requests under `prefix` other than the catalog's, by method, after line `since`: the
    outputs' publish and the report's reuse of the last generation (a server-side copy is a PUT)."""
    counts: dict[str, int] = {}
    for line in log_path.read_text(errors="replace").splitlines()[since:]:
        for method in ("GET", "PUT", "HEAD", "POST", "DELETE"):
            marker = f"{method} /{BUCKET}/{prefix}/"
            if marker in line and f"{marker}catalog/" not in line:
                counts[method] = counts.get(method, 0) + 1
    return counts


def get_bytes(log_path: Path, since: int, prefix: str) -> tuple[int, int]:
    """(GETs, bytes received) of objects under `prefix` after line `since` (the response bodies'
    bytes, as bench/moto_counting.py logs them: a ranged GET counts what it returned)."""
    marker = f'"GET /{BUCKET}/{prefix}/'
    n = total = 0
    for line in log_path.read_text(errors="replace").splitlines()[since:]:
        if marker in line:
            n += 1
            total += int(line.split('" ', 1)[1].split()[1])
    return n, total


def log_lines(log_path: Path) -> int:
    return len(log_path.read_text(errors="replace").splitlines())


def cli(env: dict, *args: str) -> float:
    cmd = [sys.executable, "-m", "pipeline", "dedupe", *args, "--quiet", "--log-level", "WARNING"]
    t = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, env=env, check=True)
    return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-source", type=int, default=2, help="transformed copies per photo")
    parser.add_argument("--bench-dir", default=str(transforms.DEFAULT_BENCH_DIR))
    parser.add_argument("--out", default=None, help="benchmarks markdown file")
    parser.add_argument("--latency-ms", type=float, default=0.0,
                        help="delay each of the server's responses, as a real bucket's round trip would "
                             "(written to its own section when > 0)")
    args = parser.parse_args()
    if not transforms.DEFAULT_PHOTOS.is_dir():
        raise SystemExit(f"{transforms.DEFAULT_PHOTOS} missing: set SHARED to the shared folder")
    source = end_to_end.generate(Path(args.bench_dir), args.per_source) / "images"
    files = sorted(p for p in source.rglob("*") if p.is_file())
    with tempfile.TemporaryDirectory(prefix="dedupe-storage-bench-") as tmp_name:
        tmp = Path(tmp_name)
        log_path = tmp / "moto.log"
        proc, endpoint = start_moto(log_path, args.latency_ms)
        try:
            env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
            env.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_ENDPOINT_URL=endpoint,
                       AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true",
                       AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull,
                       PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="2")
            import s3fs
            fs = s3fs.S3FileSystem(key="bench", secret="bench", endpoint_url=endpoint, skip_instance_cache=True)
            fs.mkdir(BUCKET)
            t = time.perf_counter()
            fs.put([str(p) for p in files], [f"{BUCKET}/data/{p.relative_to(source).as_posix()}" for p in files])
            upload = time.perf_counter() - t
            data, out, scratch = f"s3://{BUCKET}/data", f"s3://{BUCKET}/out", f"s3://{BUCKET}/scratch"

            def timed(*run_args: str) -> tuple[float, int, dict, dict, tuple[int, int]]:
                since = log_lines(log_path)
                wall = cli(env, data, *run_args)
                target = run_args[run_args.index("--out") + 1].removeprefix("s3://")
                prefix = target.removeprefix(f"{BUCKET}/")
                return (wall, object_gets(log_path, since, "data"), json.loads(fs.cat_file(f"{target}/run.json")),
                        out_requests(log_path, since, prefix), get_bytes(log_path, since, prefix))

            first = timed("--out", out)
            print(f"first run: {len(files)} objects, {first[0]:.1f} s, {first[1]} object GETs", flush=True)
            rng = random.Random(0)
            n_add, n_remove = max(1, round(0.01 * len(files))), max(1, round(0.005 * len(files)))
            for i, src in enumerate(rng.sample(files, n_add)):
                with Image.open(src) as im:
                    im = im.convert("RGB")
                    buf = io.BytesIO()
                    im.resize((max(32, im.width * 4 // 5), max(32, im.height * 4 // 5))).save(buf, "JPEG", quality=84)
                fs.pipe_file(f"{BUCKET}/data/new/added_{i:04d}.jpg", buf.getvalue())
            for src in rng.sample(files, n_remove):
                fs.rm_file(f"{BUCKET}/data/{src.relative_to(source).as_posix()}")
            incremental = timed("--out", out)
            print(f"incremental: {incremental[0]:.1f} s, {incremental[1]} object GETs", flush=True)
            fresh = timed("--out", scratch, "--no-catalog")
            print(f"scratch: {fresh[0]:.1f} s, {fresh[1]} object GETs", flush=True)
            opts = {"key": "bench", "secret": "bench", "endpoint_url": endpoint}
            for name, key in (("pairs", ["path_a", "path_b"]), ("images", ["path"])):
                x, y = (pd.read_parquet(f"{o}/{name}.parquet", storage_options=opts).sort_values(key)
                        .reset_index(drop=True) for o in (out, scratch))
                pd.testing.assert_frame_equal(x, y, check_exact=False, atol=FLOAT_ATOL, rtol=0)
            unchanged = timed("--out", out)
            print(f"unchanged: {unchanged[0]:.1f} s, {unchanged[1]} object GETs", flush=True)
            catalog_bytes = sum(fs.du(f"{BUCKET}/out/catalog", total=False).values())
        finally:
            proc.terminate()
            proc.wait(30)
    reuse = incremental[2]["reuse"]
    n_now = incremental[2]["counts"]["files"]

    def row(label, r, note):
        m = r[2]
        return [label, f"{r[0]:.1f}", f"{r[0] / fresh[0]:.2f}", r[1], m["reuse"]["screen"].get("screened", m["counts"]["files"])
                if m["reuse"].get("catalog") else m["counts"]["files"], m["scheduler_used"],
                " / ".join(f"{r[3].get(k, 0)}" for k in ("GET", "PUT", "HEAD")),
                f"{r[4][0]} / {r[4][1] / 1e6:.1f}", note]
    body = stamp() + (
        f"\n{len(files):,} images (the real photos plus {args.per_source} seeded transformed copies of each, "
        "bench/end_to_end.py's generator) uploaded to a bucket of moto's S3 server on 127.0.0.1 "
        f"({upload:.0f} s); DATA, OUT and the catalog (OUT/catalog) in the bucket; the CLI with the default "
        f"scheduler. Then +{n_add} objects (resized, re-encoded copies: new content) and -{n_remove}: the "
        "incremental run, and a run from scratch (`--no-catalog`) on the same objects (outputs checked equal: "
        "pairs.parquet and images.parquet, floats within 1e-5). *object GETs*: reads of image objects in the "
        "server's request log (the screen's reads, the ORB and embedding tiers' reads of images whose "
        "features are not stored, and the report's thumbnails and drawings not made before; those of "
        "unchanged bytes are copied from the last generation's report). *OUT requests*: GET / PUT / HEAD "
        "requests under OUT other than the catalog's (the publish of the outputs and the report; a "
        "server-side copy is a PUT). *GETs under OUT / MB*: every GET under OUT, the catalog's and the work "
        "dir's feature parts included, and the bytes they returned (bench/moto_counting.py logs each "
        "response's size: a ranged GET counts what it returned). " + (
            f"Each response delayed by {args.latency_ms:g} ms before its first byte (bench/moto_counting.py), "
            "as a real bucket's round trip would be; requests in flight at once are each delayed. "
            if args.latency_ms else
            "No network latency: the seconds are this machine's work; a real bucket adds its round trips to "
            "every request (`--latency-ms` adds one). ") + "One run each on a shared 2-core machine.\n\n")
    body += table(["run", "wall s", "vs scratch", "object GETs", "files screened", "scheduler",
                   "OUT requests GET / PUT / HEAD", "GETs under OUT / MB", "what"], [
        row("first (empty catalog)", first, "every object read"),
        row("incremental", incremental, f"{reuse['verify']['pairs_verified']} of "
            f"{incremental[2]['counts'].get('verified_pairs', 0)} candidate pairs verified"),
        row("scratch (--no-catalog)", fresh, "the baseline"),
        row("unchanged re-run", unchanged, "listing, catalog, decide, report, publish")])
    body += (f"\nCatalog in the bucket: {catalog_bytes / 1e6:.1f} MB for {n_now:,} images. Incremental reuse: "
             f"screen {json.dumps(reuse['screen'])}; verify {json.dumps(reuse.get('verify', {}))}; "
             f"confirm {json.dumps(reuse.get('confirm', {}))}.\n")
    kwargs = {"path": args.out} if args.out else {}
    if args.latency_ms:
        update_section("storage_catalog_latency", f"incremental runs with the catalog in an S3 bucket, "
                       f"{args.latency_ms:g} ms a request", body, **kwargs)
    else:
        update_section("storage_catalog", "incremental runs with the catalog in an S3 bucket", body, **kwargs)
    print(body)


if __name__ == "__main__":
    main()
