"""Wall time of each preset on the generated benchmark, as ratios to the default preset.

    python -m bench.presets [--rounds 3] [--bench-dir /tmp/dedupe-bench]

Runs `python -m pipeline dedupe GENERATED --preset NAME --quiet` for every preset, alternating the
presets within each round so that machine noise hits them alike, and reports per preset the
median wall time and the median of its per-round ratio to the default preset (section
"preset_speed" of docs/benchmarks.md). Accuracy per preset is `make eval` (section "presets").
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench import eval as bench_eval
from bench import transforms
from bench.report import median, stamp, table, update_section

PRESETS = ["fast", "default", "strict", "high-recall"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--bench-dir", default=str(transforms.DEFAULT_BENCH_DIR))
    ap.add_argument("--out", default=None, help="markdown file to update (default docs/benchmarks.md)")
    args = ap.parse_args()
    data = transforms.ensure(args.bench_dir)  # the same generated set as make eval (seed 0)
    times: dict[str, list[float]] = {p: [] for p in PRESETS}
    for r in range(args.rounds):
        for preset in PRESETS:
            out = Path(args.bench_dir) / "runs" / f"preset-{preset}"
            shutil.rmtree(out, ignore_errors=True)
            cmd = [sys.executable, "-m", "pipeline", "dedupe", str(data), "--out", str(out), "--preset", preset,
                   "--quiet", "--log-level", "WARNING"]
            if bench_eval.MODELS.is_dir():
                cmd += ["--set", f"embed.weights={bench_eval.MODELS}"]  # the shared weights folder
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, capture_output=True, cwd=bench_eval.REPO)
            times[preset].append(time.perf_counter() - t0)
            print(f"round {r + 1} {preset}: {times[preset][-1]:.1f} s", flush=True)
    rows = []
    for preset in PRESETS:
        ratios = [t / d for t, d in zip(times[preset], times["default"])]
        rows.append([preset, " / ".join(f"{t:.1f}" for t in times[preset]), f"{median(times[preset]):.1f}",
                     f"{median(ratios):.2f}x"])
    body = [stamp(), f"Generated benchmark `{data}` ({sum(1 for _ in data.rglob('*.*'))} files), "
            f"{args.rounds} rounds, presets alternating within each round. Ratio = median over rounds of "
            "(preset's time / default's time in the same round).\n",
            table(["preset", "wall s per round", "median s", "ratio to default"], rows)]
    kwargs = {"path": args.out} if args.out else {}
    update_section("preset_speed", "preset speed (python -m bench.presets)", "\n".join(body), **kwargs)


if __name__ == "__main__":
    main()
