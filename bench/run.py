"""`make bench`: every benchmark in turn, each in its own process, each writing its own section of
docs/benchmarks.md (machine, exact command, medians and same-run ratios).

    python -m bench.run [--out docs/benchmarks.md] [--only search,screen,listing,verify,confirm,embed,end_to_end,profile,worker_alloc,scheduler,scatter,fastdup,floor,storage_catalog,report_stored,driver_memory]
"""
from __future__ import annotations

import argparse
import subprocess
import sys

BENCHMARKS = ["search", "screen", "listing", "verify", "confirm", "embed", "high_recall", "end_to_end", "calibrate", "profile",
              "worker_alloc", "scheduler", "scatter", "fastdup", "floor", "storage_catalog", "report_stored", "driver_memory"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="benchmarks markdown file (default docs/benchmarks.md)")
    parser.add_argument("--only", default=",".join(BENCHMARKS), help="comma-separated subset")
    args = parser.parse_args()
    failed = []
    for name in [n.strip() for n in args.only.split(",") if n.strip()]:
        if name not in BENCHMARKS:
            parser.error(f"unknown benchmark {name!r}; choose from {', '.join(BENCHMARKS)}")
        cmd = [sys.executable, "-m", f"bench.{name}"] + (["--out", args.out] if args.out else [])
        print(f"== {' '.join(cmd)}", flush=True)
        if subprocess.run(cmd).returncode != 0:
            failed.append(name)
    if failed:
        print(f"benchmarks failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
