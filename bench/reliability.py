"""The reliability suite's summary for docs/benchmarks.md (`make reliability` runs the suite).

    python -m bench.reliability

Counts the bad-input kinds (tests/reliability_corpus.py, per group), the bad configurations and
environments and the faults that tests/test_reliability.py exercises, runs that suite
(`pytest -m reliability`) for its pass/fail counts, and measures the peak memory (VmHWM) of one
process screening the heaviest image the defaults accept: a 196-megapixel PNG (14000 x 14000, a
decompression bomb of ~190 KB) and the same as RGB, each in a fresh process beside a baseline
process that screens a small photo.
"""
from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

from bench.report import stamp, table, update_section

REPO = Path(__file__).resolve().parent.parent

PROBE = r"""
import os, sys
sys.path.insert(0, {repo!r})
from pipeline.config import ScreenConfig
from pipeline.scan import FileEntry
from pipeline.screen import screen_file
path = sys.argv[1]
row = screen_file(FileEntry(os.path.basename(path), path, os.path.getsize(path), os.stat(path).st_mtime),
                  ScreenConfig())
# VmHWM: this process's own peak (ru_maxrss would carry the forking parent's peak over exec)
print(row["error"] or "ok", next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024)
"""


def _peak(path: Path) -> tuple[str, float]:
    out = subprocess.run([sys.executable, "-c", PROBE.format(repo=str(REPO)), str(path)], capture_output=True,
                         text=True, check=True).stdout.split()
    return out[0], float(out[-1])


def main() -> None:
    sys.path.insert(0, str(REPO))
    from PIL import Image

    from tests.reliability_corpus import KINDS, _png_bomb
    from tests.test_reliability import BAD_CONFIGS, _environments

    groups = Counter(k.group for k in KINDS)
    with tempfile.TemporaryDirectory() as tmp:
        n_env = len(_environments(Path(tmp)))
        bomb_l = Path(tmp) / "bomb-grey.png"
        bomb_l.write_bytes(_png_bomb(14000, 14000))
        small = Path(tmp) / "small.png"
        Image.new("RGB", (640, 480), (90, 120, 30)).save(small)
        rgb = Path(tmp) / "rgb-100mp.png"
        Image.new("RGB", (12000, 8400), (10, 200, 30)).save(rgb, compress_level=9)
        peaks = [("small photo (baseline)", small, *_peak(small)),
                 ("PNG bomb 14000 x 14000 grey", bomb_l, *_peak(bomb_l)),
                 ("PNG 12000 x 8400 RGB (100 MP)", rgb, *_peak(rgb))]
        sizes = {name: path.stat().st_size for name, path, *_ in peaks}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "reliability", "-p", "no:cacheprovider"],
                          capture_output=True, text=True, cwd=REPO)
    summary = (re.findall(r"^=*\s*(\d+ passed.*?)\s*=*$", proc.stdout, re.M) or [proc.stdout.strip()[-200:]])[-1]
    faults = ["kill -9 in screen", "kill -9 in verify (features)", "kill -9 in confirm (embed)",
              "kill -9 in write", "SIGTERM mid-verify", "disk full while writing", "two runs into one OUT",
              "file rewritten between screen and verify"]
    body = [stamp(),
            f"Suite: `pytest -m reliability` (`make reliability`): **{summary}**.\n",
            table(["what", "count"], [[f"bad-input file kinds: {g}", n] for g, n in sorted(groups.items())]
                  + [["bad configurations", len(BAD_CONFIGS)], ["bad environments", n_env],
                     ["all input kinds", len(KINDS) + len(BAD_CONFIGS) + n_env], ["faults", len(faults)]]),
            "\nFaults: " + "; ".join(faults) + " (SIGTERM, disk full and two runs in tests/test_operator.py, "
            "the rest in tests/test_reliability.py).\n",
            "Peak memory of one process screening one file (VmHWM of a fresh process each; the baseline is "
            "the interpreter with the pipeline's imports):\n",
            table(["file", "bytes", "result", "peak MB (VmHWM)"],
                  [[name, sizes[name], result, f"{rss:.0f}"] for name, _, result, rss in peaks])]
    update_section("reliability", "reliability (python -m bench.reliability)", "\n".join(body))


if __name__ == "__main__":
    main()
