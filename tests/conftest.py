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
