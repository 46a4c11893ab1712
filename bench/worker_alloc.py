"""The verify tier's feature task in a Dask worker vs in this process: CPU per image.

    python -m bench.worker_alloc [--images 200] [--rounds 4] [--folder DIR] [--out docs/benchmarks.md]

The same `verify.features_partition` call (decode, bound, ORB, pixel-check thumbnail, Parquet
write) on the same images, timed by the CPU seconds of the thread that runs it (so other jobs on
a shared machine do not count), in three places, interleaved each round: this process; a
one-worker LocalCluster started with Dask's default worker environment (MALLOC_TRIM_THRESHOLD_=
65536); one started the way the pipeline starts its own (`pipeline.run.worker_environ`: glibc's
own allocator thresholds). Medians over rounds; ratios against in-process.
"""
from __future__ import annotations

import argparse
import contextlib
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from bench import end_to_end, transforms
from bench.report import median, stamp, table, update_section


def sample_rows(folder: Path, n: int, seed: int = 2) -> pd.DataFrame:
    """Feature-task rows (key, abs_path, transform 0, width, height) for n random files."""
    files = sorted(p for p in folder.iterdir() if p.is_file())
    files = random.Random(seed).sample(files, min(n, len(files)))
    sizes = []
    for p in files:
        with Image.open(p) as im:
            sizes.append(im.size)
    return pd.DataFrame({"key": np.arange(len(files), dtype=np.int64) * 8, "abs_path": [str(p) for p in files],
                         "transform": np.zeros(len(files), np.int8),
                         "width": [s[0] for s in sizes], "height": [s[1] for s in sizes]})


def timed_features(rows: pd.DataFrame, out_dir: str) -> float:
    """Thread CPU seconds of one features_partition call over `rows`."""
    from pipeline import verify
    from pipeline.config import Config
    start = time.thread_time()
    verify.features_partition(rows, Config(), out_dir, 0)
    return time.thread_time() - start


def peak_rss_mib() -> float:
    """This process's peak resident memory (MiB)."""
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--folder", default=None, help="images to use (default: the generated 10k benchmark "
                    "folder under --bench-dir)")
    ap.add_argument("--bench-dir", default=str(transforms.DEFAULT_BENCH_DIR))
    ap.add_argument("--out", default=None, help="benchmarks markdown file (default docs/benchmarks.md)")
    args = ap.parse_args(argv)
    from distributed import Client, LocalCluster

    from pipeline.run import worker_environ

    folder = Path(args.folder) if args.folder else end_to_end.generate(Path(args.bench_dir), 12) / "images"
    rows = sample_rows(folder, args.images)
    places = {"in-process": None, "worker, Dask's default environment": contextlib.nullcontext,
              "worker, as the pipeline starts it": worker_environ}
    cpu: dict[str, list[float]] = {p: [] for p in places}
    with tempfile.TemporaryDirectory(prefix="bench-worker-alloc-") as tmp, contextlib.ExitStack() as stack:
        clients = {}
        # the pipeline's way first: a nanny copies its spawn environment into this process's
        # os.environ, which later workers inherit
        for place, env in reversed(places.items()):
            if env is None:
                continue
            with env():  # read by the nanny when it spawns the worker
                cluster = stack.enter_context(LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                                                           dashboard_address=None))
            clients[place] = stack.enter_context(Client(cluster, set_as_default=False))
        for place, client in clients.items():  # imports and the first decode out of the timing
            client.submit(timed_features, rows.iloc[:5], f"{tmp}/warm", pure=False).result()
        timed_features(rows.iloc[:5], f"{tmp}/warm")
        for r in range(args.rounds):
            for place in places:
                out = f"{tmp}/{r}-{len(cpu[place])}-{places[place] is None}"
                if place in clients:
                    cpu[place].append(clients[place].submit(timed_features, rows, out, pure=False).result())
                else:
                    cpu[place].append(timed_features(rows, out))
                print(f"round {r + 1}: {place}: {cpu[place][-1]:.2f} s CPU", flush=True)
        rss = {place: next(iter(c.run(peak_rss_mib).values())) for place, c in clients.items()}
    base = median(cpu["in-process"])
    body_rows = [[place, f"{median(v):.2f}", f"{1000 * median(v) / len(rows):.2f}", f"{len(rows) / median(v):.0f}",
                  f"{median(v) / base:.2f}x", f"{rss[place]:.0f}" if place in rss else ""]
                 for place, v in cpu.items()]
    body = (stamp() + f"\n{len(rows)} random files of `{folder}`, one `verify.features_partition` call each "
            f"(default settings), {args.rounds} rounds interleaved; CPU seconds of the thread running it, "
            "medians.\n\n"
            + table(["where", "CPU s", "ms / image", "images / CPU s",
                     "vs in-process", "worker peak RSS MiB"], body_rows)
            + "\nDask starts its workers with MALLOC_TRIM_THRESHOLD_=65536 (to hand freed memory back to the "
              "OS at once); setting it also stops glibc from raising its mmap threshold, so every image-sized "
              "buffer (decoded image, resized copies, ORB's pyramid) is mapped and page-faulted afresh. The "
              "pipeline's local cluster leaves it unset (`pipeline.run.worker_environ`); a value set in the "
              "environment still reaches the workers.\n")
    print(body)
    kwargs = {"path": args.out} if args.out else {}
    update_section("worker-alloc", "verify feature tasks: in a Dask worker vs in-process "
                   "(python -m bench.worker_alloc)", body, **kwargs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
