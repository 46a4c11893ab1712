"""Writing benchmark figures into docs/benchmarks.md, one replaceable section per benchmark.

Each benchmark owns a section delimited by HTML comments, so re-running one benchmark updates its
figures and leaves the others in place. Every section states the machine and the exact command.
"""
from __future__ import annotations

import os
import platform
import re
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

DEFAULT_PATH = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
HEADER = """# Benchmarks and accuracy

Figures written by `make bench` and `make eval` (each section by its own script; re-running one
replaces only its section). Timings are medians of repeated runs on a noisy shared machine: read the
ratios against the baseline measured in the same run, not the absolute seconds.
"""


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f", {kb / 1024 / 1024:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    return f"{cpu}, {os.cpu_count()} cores{mem}, Python {platform.python_version()}, {platform.system()} {platform.release()}"


def command() -> str:
    return " ".join(shlex.quote(a) for a in [Path(sys.executable).name, "-m", *sys.argv]).replace(
        f"-m {shlex.quote(sys.argv[0])}", f"-m {_module_name()}")


def _module_name() -> str:
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    return spec.name if spec else sys.argv[0]


def git_rev() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=False).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def stamp(cmd: str | None = None) -> str:
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (f"- Machine: {machine()}\n- Command: `{cmd or command()}`\n"
            f"- Date: {when}, commit {git_rev()}\n")


def run_script_in_tree(script: str | Path, tree: str | Path, args: list[str], name: str) -> str:
    """`script` run in a child process with another source `tree` on PYTHONPATH, from / (so that
    neither this tree nor the working directory comes first; the tree may have no such script):
    its stdout, or SystemExit with its stderr's end when it fails."""
    proc = subprocess.run([sys.executable, "-c", "import runpy, sys; sys.argv = sys.argv[1:]; "
                           "runpy.run_path(sys.argv[0], run_name='__main__')", str(script), *args],
                          cwd="/", capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(tree)))
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout


def median(values) -> float:
    return float(np.median(np.asarray(values, dtype=float)))


def interleaved_runs(ways: dict, repeats: int, warm_up: bool = False, before=None, after=None):
    """Each of `ways` (name -> a callable returning a frame) run `repeats` times, the ways taking
    turns so that the machine's drift falls on each alike (`warm_up`: one more round first, not
    counted); `before()` ahead of each run, `after()` behind it (e.g. a memory peak). Every result
    must equal the first (SystemExit otherwise). Returns (seconds per way, after()'s values per
    way, the first result)."""
    times = {name: [] for name in ways}
    extra = {name: [] for name in ways}
    first = None
    for r in range(repeats + int(warm_up)):
        for name, run in ways.items():
            if before is not None:
                before()
            t = time.perf_counter()
            got = run()
            seconds = time.perf_counter() - t
            counted = r >= int(warm_up)
            if counted:
                times[name].append(seconds)
                if after is not None:
                    extra[name].append(after())
            if first is None:
                first, first_name = got, name
            elif not got.equals(first):
                raise SystemExit(f"{name}: the lists differ from {first_name}'s")
            print(r, name, f"{seconds:.2f} s", flush=True)
            del got
    return times, extra, first


def table(headers: list[str], rows: list[list]) -> str:
    def fmt(v):
        if isinstance(v, float):
            if v != v or v in (float("inf"), float("-inf")):  # (no value: a precision of nothing predicted)
                return "–"
            return f"{v:.3f}" if abs(v) < 100 else f"{v:,.0f}"
        return str(v)
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(out) + "\n"


def update_section(name: str, title: str, body: str, path: str | Path = DEFAULT_PATH) -> Path:
    """Replace (or append) section `name` of the benchmarks file with `title` + `body`.
    `path` "-": print the section instead (no file is written)."""
    if str(path) == "-":
        print(f"## {title}\n\n{body.rstrip()}")
        return Path("-")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = path.read_text(encoding="utf-8") if path.exists() else HEADER
    block = f"<!-- section:{name} -->\n## {title}\n\n{body.rstrip()}\n<!-- /section:{name} -->"
    pattern = re.compile(rf"<!-- section:{re.escape(name)} -->.*?<!-- /section:{re.escape(name)} -->", re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path
