"""Wall time against fastdup on the same folder, in the same run: this project's CLI (default and
high-recall presets) and fastdup with its defaults, alternating within each round.

    python -m bench.fastdup [--sizes small,10k] [--rounds 3] [--out docs/benchmarks.md]

fastdup lives in its own virtualenv (`make fastdup`: .venv-fastdup, fastdup from PyPI) and runs
offline-safe (SENTRY_OPT_OUT=1 FASTDUP_PRODUCTION=1: no telemetry, no update check). Without that
virtualenv the benchmark says so and stops (exit 0, nothing written).

Folders: "small" = the shared real photos ($SHARED/data/photos, 805 files); "10k" = the generated
end-to-end folder (bench/end_to_end.py: the 805 photos + 12 seeded edited copies each, 10,465
files). Each contender runs as a fresh process with a fresh output folder (no catalog reuse); the
time is the process's wall time, start-up included. Per size: medians over rounds and the median
of the per-round ratios (ours / fastdup), which is the figure to read on a shared machine.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import end_to_end, transforms
from bench.report import median, stamp, table, update_section

REPO = Path(__file__).resolve().parent.parent
FASTDUP_VENV = Path(os.environ.get("FASTDUP_VENV", REPO / ".venv-fastdup"))
FASTDUP_ENV = {"SENTRY_OPT_OUT": "1", "FASTDUP_PRODUCTION": "1"}
# fastdup with its defaults: create() + run(); overwrite so a reused work dir is not resumed
FASTDUP_SCRIPT = ("import sys, fastdup\n"
                  "fd = fastdup.create(work_dir=sys.argv[2], input_dir=sys.argv[1])\n"
                  "fd.run(overwrite=True, verbose=False)\n")
CONTENDERS = ["default", "high-recall", "fastdup"]


def fastdup_python() -> Path | None:
    py = FASTDUP_VENV / "bin" / "python"
    return py if (FASTDUP_VENV / ".installed").exists() and py.exists() else None


def folder(size: str, bench_dir: Path) -> Path:
    if size == "small":
        return transforms.DEFAULT_PHOTOS
    if size == "10k":
        return end_to_end.generate(bench_dir, 12) / "images"
    raise SystemExit(f"unknown size {size!r}: choose small and/or 10k")


def run_ours(data: Path, preset: str, out: Path) -> dict:
    cmd = [sys.executable, "-m", "pipeline", "dedupe", str(data), "--out", str(out), "--preset", preset,
           "--quiet", "--log-level", "WARNING"]
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"pipeline failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    manifest = json.loads((out / "run.json").read_text())
    return {"wall": wall, "timings": manifest["timings_s"], "scheduler": manifest.get("scheduler_used"),
            "duplicates": manifest["counts"].get("duplicate_pairs")}


def run_fastdup(py: Path, data: Path, work: Path) -> dict:
    env = {**os.environ, **FASTDUP_ENV}
    t = time.perf_counter()
    proc = subprocess.run([str(py), "-c", FASTDUP_SCRIPT, str(data), str(work)], env=env,
                          capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"fastdup failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-2000:]}")
    sim = work / "similarity.csv"
    pairs = max(0, sum(1 for _ in sim.open()) - 1) if sim.exists() else None
    return {"wall": wall, "duplicates": pairs}


def fastdup_version(py: Path) -> str:
    proc = subprocess.run([str(py), "-c", "from importlib.metadata import version; print(version('fastdup'))"],
                          capture_output=True, text=True, env={**os.environ, **FASTDUP_ENV})
    return proc.stdout.strip() or "unknown"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="small,10k", help="comma-separated: small (805 real photos), 10k (generated)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--contenders", default=",".join(CONTENDERS), help="subset of " + ",".join(CONTENDERS))
    ap.add_argument("--bench-dir", default=str(transforms.DEFAULT_BENCH_DIR))
    ap.add_argument("--out", default=None, help="benchmarks markdown file (default docs/benchmarks.md)")
    args = ap.parse_args(argv)
    py = fastdup_python()
    if py is None:
        print(f"fastdup benchmark skipped: no virtualenv at {FASTDUP_VENV} (run `make fastdup` first)",
              file=sys.stderr)
        return 0
    if not transforms.DEFAULT_PHOTOS.is_dir():
        print(f"fastdup benchmark skipped: {transforms.DEFAULT_PHOTOS} missing (set SHARED)", file=sys.stderr)
        return 0
    contenders = [c for c in args.contenders.split(",") if c]
    if "fastdup" not in contenders or not set(contenders) <= set(CONTENDERS):
        ap.error(f"--contenders: a subset of {','.join(CONTENDERS)} that includes fastdup")
    sections = []
    for size in [s.strip() for s in args.sizes.split(",") if s.strip()]:
        data = folder(size, Path(args.bench_dir))
        n_files = sum(1 for p in data.rglob("*") if p.is_file())
        walls: dict[str, list[float]] = {c: [] for c in contenders}
        stages: dict[str, list[dict]] = {c: [] for c in contenders}
        dups: dict[str, object] = {}
        with tempfile.TemporaryDirectory(prefix="bench-fastdup-") as tmp:
            for r in range(args.rounds):
                # rotate the order each round so no contender always runs first (cold caches) or last
                order = contenders[r % len(contenders):] + contenders[:r % len(contenders)]
                for c in order:
                    out = Path(tmp) / f"{c}-{r}"
                    res = run_fastdup(py, data, out) if c == "fastdup" else run_ours(data, c, out)
                    shutil.rmtree(out, ignore_errors=True)
                    walls[c].append(res["wall"])
                    stages[c].append(res.get("timings") or {})
                    dups[c] = res["duplicates"]
                    print(f"{size} round {r + 1} {c}: {res['wall']:.1f} s", flush=True)
        rows = []
        for c in contenders:
            ratios = [w / f for w, f in zip(walls[c], walls["fastdup"])]
            rows.append([c, " / ".join(f"{w:.1f}" for w in walls[c]), f"{median(walls[c]):.1f}",
                         f"{median(ratios):.2f}x", "" if dups[c] is None else f"{dups[c]:,}"])
        stage_rows = []
        for c in contenders:
            if c == "fastdup" or not stages[c][0]:
                continue
            keys = list(dict.fromkeys(k for s in stages[c] for k in s))
            stage_rows.append([c, ", ".join(f"{k} {median([s.get(k, 0.0) for s in stages[c]]):.1f}" for k in keys)])
        sections.append(f"### {size}: `{data}` ({n_files:,} files)\n\n"
                        + table(["contender", "wall s per round", "median s", "ratio to fastdup (median)",
                                 "pairs reported"], rows)
                        + "\nStage seconds from run.json (medians):\n\n" + table(["preset", "stages"], stage_rows))
    body = (stamp() + f"\nfastdup {fastdup_version(py)} with its defaults (`fastdup.create(work_dir, input_dir)"
            ".run()`, its own virtualenv, SENTRY_OPT_OUT=1 FASTDUP_PRODUCTION=1) against this project's CLI "
            "(`python -m pipeline dedupe DATA --preset P`, default settings otherwise), each a fresh process "
            f"and output folder, {args.rounds} rounds, the order rotating each round. Ratio = median over rounds "
            "of (contender's wall / fastdup's wall in the same round). \"pairs reported\": our duplicate "
            "pairs; fastdup's similarity.csv rows (its similar pairs above its default threshold, not a "
            "duplicate verdict).\n\n" + "\n".join(sections))
    print(body)
    kwargs = {"path": args.out} if args.out else {}
    update_section("fastdup", "against fastdup, same folder, same run (python -m bench.fastdup)", body, **kwargs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
