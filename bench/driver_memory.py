"""The driver's memory: peak RSS of the CLI process alone (not its Dask workers) per stage, and the
bytes per image it adds, from two folder sizes of the same pair density.

The data: the end-to-end folder (bench/end_to_end.py, every real photo + 12 transformed copies)
and a subset of whole groups of it (hard links), so both sizes have about the same pairs per image;
the slope between them is the driver's cost per image, the intercept its fixed cost (the cluster's
scheduler, imports). Each size runs the whole cascade through the CLI with default settings (a
catalog in OUT) on a local cluster, the driver's RSS sampled every 0.1 s and attributed to the
stage whose "started" line it logged last. `--baseline DIR` also runs another source tree (e.g. an
earlier commit: `git archive COMMIT | tar -x -C DIR`) alternately with this one, same data, same
run, so the two read as a same-run comparison.

    python -m bench.driver_memory [--sizes 5000,0] [--baseline DIR] [--bench-dir /tmp/dedupe-bench]
                                  [--fresh-model-cache | --rerun [--catalog-from OUT] | --scale-rounds 4]

`--fresh-model-cache`: every run starts with no TensorFlow Lite conversion in its model cache (the
first run on a new machine), written to its own section (driver_memory_fresh). `--rerun`: the
measured run is each OUT's second (the catalog present, nothing changed: a nightly run over an
unchanged collection), written to its own section (driver_memory_rerun); with `--catalog-from OUT`
(an OUT of an earlier run over the same folder) each measured run starts from a hard-linked copy of
that OUT instead of a first run of its own (a 100k first run takes ~15 minutes per tree here), and
`--rerun --scale-rounds 4` then measures the re-run at the 100k folder (driver_memory_rerun_scale).
`--new-out` (with `--catalog-from`): only that OUT's catalog is linked, into a new OUT (a run beside a
shared catalog, with no earlier report to take thumbnails and drawings from; sections ..._new_out).
`--scale-rounds 4`: one
size, the 100,625-file folder of bench/scale.py instead of the subsets (section driver_memory_scale),
the point docs/cost-model.md draws the driver's bytes per image to. `--external`: each size also
runs with the scheduler in its own process (`dask scheduler` + `dask worker --nworkers 2` on
127.0.0.1, started afresh per run, the workers in their own empty folder), as on a real cluster:
the driver's RSS then holds the pipeline's own tables and no scheduler, whose RSS is sampled beside
it (section driver_memory_external).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

from bench import cluster, transforms
from bench.end_to_end import generate
from bench.report import stamp, table, update_section

REPO = Path(__file__).resolve().parent.parent
STAGE_LINE = re.compile(r"\b([a-z][\w-]*): started\b")


def subset(images: Path, n: int, out: Path) -> Path:
    """The first whole groups (file names `gNNNN_...`) of `images` holding at least n files, as hard
    links under `out` (made once)."""
    files = sorted(p.name for p in images.iterdir())
    if n <= 0 or n >= len(files):
        return images
    groups: dict[str, list[str]] = {}
    for name in files:
        groups.setdefault(name.split("_", 1)[0], []).append(name)
    chosen: list[str] = []
    for names in groups.values():
        if len(chosen) >= n:
            break
        chosen += names
    folder = out / f"subset-{n}" / "images"
    if not folder.is_dir() or sum(1 for _ in folder.iterdir()) != len(chosen):
        folder.mkdir(parents=True, exist_ok=True)
        for name in chosen:
            if not (folder / name).exists():
                os.link(images / name, folder / name)
    return folder


def fresh_model_cache(folder: Path) -> Path:
    """A Keras home under `folder` whose models/ holds links to this machine's weight files and no
    TensorFlow Lite conversion: a run with it converts the model, as the first run on a new
    machine (or container) does."""
    from pipeline.weights import cache_dirs
    models = folder / "models"
    models.mkdir(parents=True)
    for d in cache_dirs():
        for f in d.glob("*.h5") if d.is_dir() else []:
            if not (models / f.name).exists():
                (models / f.name).symlink_to(f.resolve())
    return folder


@contextlib.contextmanager
def external_cluster(env: dict, workers: int = 2):
    """A `dask scheduler` and `dask worker --nworkers N --nthreads 1` on 127.0.0.1 (bench/cluster.py),
    each process in its own empty folder (no shared working directory), with `env` (the tree's
    PYTHONPATH: the workers unpickle its `pipeline` functions). Yields (address, the scheduler's pid)."""
    with tempfile.TemporaryDirectory(prefix="dedupe-drvmem-sched-") as sdir, \
            tempfile.TemporaryDirectory(prefix="dedupe-drvmem-worker-") as wdir, \
            cluster.external_cluster(env, Path(sdir), [cluster.Worker(Path(wdir), nworkers=workers)]) as found:
        yield found


def run_driver(data: Path, source: Path | None = None, fresh: bool = False, rerun: bool = False,
               external: bool = False, catalog_from: Path | None = None, new_out: bool = False) -> dict:
    """One CLI run (whole cascade, local cluster): the driver's peak RSS, per stage and overall.
    `fresh`: with an empty model cache (`fresh_model_cache`). `rerun`: the measured run is the
    second into the same OUT (its catalog made by a first, unmeasured run; nothing changed): the
    nightly run over a collection that did not change. `external`: on an `external_cluster`
    instead (its scheduler's peak RSS is returned too, as "scheduler_peak"). `catalog_from`: with
    `rerun`, the OUT (and its catalog) of an earlier run over `data`, hard-linked into the run's OUT
    instead of a first run (a run replaces its output and catalog files, never writes into them; its
    lock files, which it rewrites, are left out); `new_out`: only its catalog, in a new OUT."""
    env = dict(os.environ)
    keras_home = tempfile.TemporaryDirectory(prefix="dedupe-drvmem-keras-") if fresh else None
    if keras_home is not None:
        env["KERAS_HOME"] = str(fresh_model_cache(Path(keras_home.name) / "keras"))
    if source is not None:  # another source tree first on the path (its `pipeline` package)
        env["PYTHONPATH"] = os.pathsep.join([str(source), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    with (external_cluster(env) if external else contextlib.nullcontext((None, None))) as (address, sched_pid), \
            tempfile.TemporaryDirectory(prefix="dedupe-drvmem-") as out:
        cmd = [sys.executable, "-m", "pipeline", "dedupe", str(data), "--out", out,
               "--scheduler", address or "local", "--log-level", "INFO"]
        if rerun and catalog_from is not None:
            import shutil

            from pipeline import catalog, outdir
            # (not the lock files: a run rewrites its lock in place, which a link would share)
            try:
                shutil.copytree(catalog_from / "catalog" if new_out else catalog_from,
                                Path(out) / "catalog" if new_out else out, copy_function=os.link,
                                dirs_exist_ok=True, symlinks=True,
                                ignore=shutil.ignore_patterns(outdir.LOCK_NAME, catalog.LOCK_NAME))
            except (OSError, shutil.Error) as exc:  # (e.g. EXDEV: a link cannot cross filesystems)
                raise SystemExit(f"--catalog-from {catalog_from}: cannot hard-link it into {out} ({exc}); put "
                                 "it on the same filesystem as the temporary folder (TMPDIR)") from None
        elif rerun:
            first = subprocess.run(cmd, cwd=source or REPO, env=env, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, text=True, errors="replace")
            if first.returncode != 0:
                raise SystemExit(f"pipeline failed ({first.returncode}): {' '.join(cmd)}\n{first.stderr[-4000:]}")
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=source or REPO, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, errors="replace")
        stage = ["start"]
        lines: list[str] = []

        def read():
            for line in proc.stderr:
                lines.append(line)
                found = STAGE_LINE.search(line)
                if found:
                    stage[0] = found.group(1)
        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        driver = psutil.Process(proc.pid)
        scheduler = psutil.Process(sched_pid) if sched_pid else None
        peaks: dict[str, int] = {}
        sched_peak = 0
        while proc.poll() is None:
            try:
                rss = driver.memory_info().rss
                if scheduler is not None:
                    sched_peak = max(sched_peak, scheduler.memory_info().rss)
            except psutil.Error:
                break
            peaks[stage[0]] = max(peaks.get(stage[0], 0), rss)
            time.sleep(0.1)
        proc.wait()
        wall = time.perf_counter() - started
        reader.join()
        if proc.returncode != 0:
            raise SystemExit(f"pipeline failed ({proc.returncode}): {' '.join(cmd)}\n{''.join(lines[-20:])}")
        manifest = json.loads((Path(out) / "run.json").read_text())
    screen = (manifest.get("reuse") or {}).get("screen", {})
    # (files whose record is an error are read at every run)
    screened = screen.get("screened", 0) - screen.get("why_screened", {}).get("failed_last_time", 0)
    if rerun and screened:  # (a catalog of another folder, or files changed: not the run asked for)
        raise SystemExit(f"the measured run read {screened} of {data}'s files again: it was not a re-run over an "
                         "unchanged folder" + (f" (is {catalog_from} an OUT of a run over {data}?)"
                                               if catalog_from is not None else ""))
    if keras_home is not None:
        keras_home.cleanup()
    top = max(peaks, key=peaks.get)
    return {"peak": peaks[top], "peak_stage": top, "stages": peaks, "counts": manifest["counts"], "wall": wall,
            "reuse": manifest.get("reuse"), "scheduler_peak": sched_peak if external else None}  # (the run.json of trees before 1911e4c has none)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="5000,0", help="files per run; 0 = the whole folder")
    parser.add_argument("--per-source", type=int, default=12, help="transformed copies per photo (the folder)")
    parser.add_argument("--baseline", default=None, help="another source tree to run alongside (same data)")
    parser.add_argument("--bench-dir", default=str(transforms.DEFAULT_BENCH_DIR))
    parser.add_argument("--out", default=None, help="benchmarks markdown file")
    parser.add_argument("--fresh-model-cache", action="store_true",
                        help="each run starts with no TensorFlow Lite conversion (a new machine's first run)")
    parser.add_argument("--rerun", action="store_true",
                        help="measure the second run into the same OUT (catalog present, nothing changed)")
    parser.add_argument("--catalog-from", default=None,
                        help="with --rerun: an OUT of an earlier run over the same folder to start each "
                             "measured run from (hard links), instead of a first run")
    parser.add_argument("--new-out", action="store_true",
                        help="with --catalog-from: link only its catalog, into a new OUT (no earlier report)")
    parser.add_argument("--scale-rounds", type=int, default=0,
                        help="measure the scale folder of bench/scale.py with this many rounds (4: 100,625 "
                             "files) instead of --sizes")
    parser.add_argument("--external", action="store_true",
                        help="also run each size on an external scheduler + 2 workers (the scheduler out of "
                             "the driver), alternating with the local cluster")
    args = parser.parse_args()
    if args.external and (args.fresh_model_cache or args.rerun):
        parser.error("--external compares where the scheduler runs on a first run: "
                     "pass it without --fresh-model-cache and --rerun")
    if args.fresh_model_cache and args.rerun:
        parser.error("--fresh-model-cache and --rerun measure different runs: pass one of them")
    if args.scale_rounds < 0:
        parser.error("--scale-rounds: pass the number of rounds (4: 100,625 files), or leave it out")
    if args.catalog_from and not args.rerun:
        parser.error("--catalog-from gives the catalog of a re-run: pass it with --rerun")
    if args.new_out and not args.catalog_from:
        parser.error("--new-out links the catalog of --catalog-from OUT into a new OUT: pass --catalog-from")
    if args.new_out and args.catalog_from and not (Path(args.catalog_from) / "catalog" / "manifest.json").is_file():
        parser.error(f"--new-out: {args.catalog_from} has no catalog in OUT/catalog to link")
    if args.catalog_from and not (Path(args.catalog_from) / "run.json").is_file():
        parser.error(f"--catalog-from {args.catalog_from}: not the OUT of a finished run (no run.json)")
    if args.catalog_from and not args.scale_rounds and len(args.sizes.split(",")) != 1:
        parser.error("--catalog-from: an OUT's catalog is one folder's; pass one size (e.g. --sizes 0) or "
                     "--scale-rounds")
    if args.scale_rounds and args.rerun and not args.catalog_from:
        parser.error("--scale-rounds --rerun: pass --catalog-from OUT (an OUT of a first run over the scale "
                     "folder), rather than a first run of ~15 minutes per tree")
    if args.scale_rounds and args.fresh_model_cache:
        parser.error("--scale-rounds measures a run with the model cache as it is: "
                     "pass it without --fresh-model-cache")
    if args.scale_rounds:
        from bench.scale import generate as generate_scale
        folders = [generate_scale(Path(args.bench_dir), args.scale_rounds) / "images"]
    else:
        data = generate(Path(args.bench_dir), args.per_source) / "images"
        folders = [subset(data, int(s), Path(args.bench_dir) / "driver-memory") for s in args.sizes.split(",")]
    trees = {"this tree": None} if not args.baseline else {"baseline": Path(args.baseline), "this tree": None}
    modes = ("local", "external") if args.external else ("local",)
    results: dict[tuple[str, str, int], dict] = {}
    for i, folder in enumerate(folders):
        n = sum(1 for _ in folder.iterdir())
        for name, source in trees.items():
            for mode in modes:
                r = run_driver(folder, source, fresh=args.fresh_model_cache, rerun=args.rerun,
                               external=mode == "external",
                               catalog_from=Path(args.catalog_from) if args.catalog_from else None,
                               new_out=args.new_out)
                results[(name, mode, n)] = r
                print(name, mode, n, round(r["peak"] / 1e6), r["peak_stage"], flush=True)
    rows = []
    for (name, mode, n), r in results.items():
        c = r["counts"]
        stages = ", ".join(f"{k} {v / 1e6:.0f}" for k, v in r["stages"].items())
        row = [name, f"{n:,}", f"{(c['exact_pairs'] + c['near_candidates']) / n:.2f}",
               f"{r['peak'] / 1e6:.0f}", r["peak_stage"], stages]
        if args.external:
            sched = "in the driver" if r["scheduler_peak"] is None else f"{r['scheduler_peak'] / 1e6:.0f}"
            row[1:1] = [mode]
            row[-1:-1] = [sched]
        if args.baseline:  # (one run each: a ratio in the same run, not a time to quote)
            row.append(f"{r['wall'] / results[('baseline', mode, n)]['wall']:.2f}")
        rows.append(row)
    body = stamp() + (
        "\nThe driver alone (the CLI process, which also hosts the local cluster's scheduler; not the "
        "workers): peak RSS over the run and the peak within each stage (MB, attributed to the stage "
        "whose \"started\" line came last; \"start\" is before the screen). Whole cascade, default "
        "settings, a catalog in OUT, `--scheduler local` (2 workers). "
        + ("Here each size also runs, alternating with it, on an external scheduler (`--scheduler "
           "tcp://127.0.0.1:PORT` of a `dask scheduler` and `dask worker --nworkers 2 --nthreads 1` started "
           "afresh for the run, each in its own empty folder), as on a real cluster: the driver then hosts "
           "no scheduler, and the scheduler process's own peak RSS is beside it. " if args.external else "")
        + ("The folder is bench/scale.py's (every real photo and its rounds of the 31 transforms), "
           "at its own pair density. " if args.scale_rounds else
           "Sizes are whole groups of the end-to-end folder, so pairs per image stay alike; bytes per image = "
           "the slope of the peak between the two sizes. ")
        + "\"confirm\" runs to the write stage, so it holds decide and the catalog commit; "
        "\"write\" holds the report."
        + (" Every run starts with an empty model cache (`--fresh-model-cache`: the weight files linked, no "
           "TensorFlow Lite conversion), as the first run on a new machine or container does."
           if args.fresh_model_cache else "")
        + (" Each measured run is the second into its OUT (`--rerun`: "
           + ("a new OUT holding only a hard-linked copy of an earlier run's catalog, `--catalog-from "
              "--new-out`: no earlier report" if args.new_out else
              "a hard-linked copy of an earlier run's OUT, `--catalog-from`, holds the catalog"
              if args.catalog_from else "a first, unmeasured run made the catalog")
           + "; no file changed), as a nightly run over an unchanged collection is (\"start\" holds the "
           "catalog's load): every file, "
           "list and pair score comes from the catalog, so the stages that found nothing to do log no "
           "\"started\" line and their bytes count under the stage before."
           if args.rerun else "") + "\n\n")
    header = ["tree", "files", "pairs / image", "driver peak MB", "peak in stage", "peak per stage (MB)"]
    if args.external:
        header[1:1] = ["scheduler"]
        header[-1:-1] = ["scheduler process peak MB"]
    if args.baseline:
        header.append("wall time / baseline's")
    body += table(header, rows)
    sizes = sorted({n for _, _, n in results})
    if len(sizes) >= 2:
        lo, hi = sizes[0], sizes[-1]
        body += "\n"
        for name in trees:
            for mode in modes:
                slope = (results[(name, mode, hi)]["peak"] - results[(name, mode, lo)]["peak"]) / (hi - lo)
                fixed = results[(name, mode, lo)]["peak"] - slope * lo
                label = f"{name}, {mode} scheduler" if args.external else name
                body += (f"- {label}: {slope / 1e3:.1f} kB per image between {lo:,} and {hi:,} files "
                         f"(intercept {fixed / 1e6:.0f} MB)\n")
    kwargs = {"path": args.out} if args.out else {}
    if args.external:
        update_section("driver_memory_external" + ("_scale" if args.scale_rounds else ""),
                       "driver memory with the scheduler in its own process"
                       + (" (100k scale folder)" if args.scale_rounds else ""), body, **kwargs)
    elif args.scale_rounds and args.rerun:
        update_section("driver_memory_rerun_scale" + ("_new_out" if args.new_out else ""),
                       "driver memory of a re-run at the 100k scale folder"
                       + (", into a new OUT beside the catalog" if args.new_out else ""), body, **kwargs)
    elif args.scale_rounds:
        update_section("driver_memory_scale", "driver memory at the 100k scale folder", body, **kwargs)
    elif args.fresh_model_cache:
        update_section("driver_memory_fresh", "driver memory on a new machine's first run", body, **kwargs)
    elif args.rerun:
        update_section("driver_memory_rerun" + ("_new_out" if args.new_out else ""),
                       "driver memory of a re-run over an unchanged folder"
                       + (", into a new OUT beside the catalog" if args.new_out else ""), body, **kwargs)
    else:
        update_section("driver_memory", "driver memory per image (whole cascade)", body, **kwargs)


if __name__ == "__main__":
    main()
