"""Shared fixtures: the real data and weights beside the checkout (`../shared`, or $SHARED)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("SHARED", REPO.parent / "shared")).resolve()


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} is missing: put the project's shared folder beside the checkout "
                    f"(../shared) or point $SHARED at it")
    return path


@pytest.fixture(scope="session")
def shared() -> Path:
    return _need(SHARED)


@pytest.fixture(scope="session")
def photos_dir() -> Path:
    return _need(SHARED / "data" / "photos")


@pytest.fixture(scope="session")
def labelled_dir() -> Path:
    return _need(SHARED / "data" / "labelled")


@pytest.fixture(scope="session")
def models_dir() -> Path:
    return _need(SHARED / "models")


@pytest.fixture(scope="session")
def photo_paths(photos_dir) -> list[Path]:
    return sorted(p for p in photos_dir.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))


# A small real review set: photos, edited copies (bench/transforms.py), an exact copy, a corrupt
# file and a folder whose name is HTML (the report must show it as text). Shared by the report,
# results and browser tests; made and run once per session.
REVIEW_EDITS = {0: ["exact_copy", "jpeg_q50", "hflip"], 1: ["crop_90_centre", "text_overlay"],
                2: ["resize_50", "crop_60_offset"], 3: ["brightness", "rot90"], 4: ["crop_75_offset"]}
EVIL_FOLDER = 'evil</script><img src=x onerror="alert(1)">&amp'


@pytest.fixture(scope="session")
def review_data(photo_paths, tmp_path_factory) -> Path:
    from bench import transforms
    if len(photo_paths) < 10:
        pytest.skip("need at least 10 photos in ../shared/data/photos")
    root = tmp_path_factory.mktemp("review") / "data"
    (root / "originals").mkdir(parents=True)
    (root / "edits").mkdir()
    (root / EVIL_FOLDER).mkdir(parents=True)  # "evil<" / "script>...": the path holds "</script>"
    step = len(photo_paths) // 10
    sources = [photo_paths[i * step] for i in range(10)]
    for i, src in enumerate(sources):
        (root / "originals" / f"p{i}{src.suffix.lower()}").write_bytes(src.read_bytes())
        for name in REVIEW_EDITS.get(i, []):
            data, ext, _ = transforms.render(src, name, seed=0, group=f"p{i}")
            folder = root / (EVIL_FOLDER if name == "text_overlay" else "edits")
            (folder / f"p{i}_{name}{ext}").write_bytes(data)
    (root / "edits" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg" + bytes(100))
    return root


@pytest.fixture(scope="session")
def review_run(review_data, models_dir, tmp_path_factory) -> Path:
    """The full cascade (real ORB, real MobileNet) over `review_data` in high-recall mode (embedding
    neighbours as candidates too: rejected and confirm-stage pairs to show); returns OUT."""
    import subprocess
    import sys
    out = tmp_path_factory.mktemp("review-out") / "out"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, "-m", "pipeline", "dedupe", str(review_data), "--out", str(out),
                             "--scheduler", "sync", "--quiet", "--set", "screen.mode=hash+embedding",
                             "--set", "screen.embedding_min_cosine=0.3"],
                            capture_output=True, text=True, env=env, cwd=REPO, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def kill_when_logged(proc, marker: str, timeout: float = 120) -> None:
    """SIGKILL `proc` (a Popen with text stderr) as soon as a stderr line holds `marker` (a kill -9
    mid-run, as a scheduler or the OOM killer does); waits for it to end, killed or not."""
    import signal
    try:
        for line in proc.stderr:
            if marker in line:
                proc.send_signal(signal.SIGKILL)
                break
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
