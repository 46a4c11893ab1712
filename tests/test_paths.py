"""Any name the filesystem can hold is scanned, decoded and written: names that are not valid
UTF-8, and paths longer than PATH_MAX."""
from __future__ import annotations

import hashlib
import json
import os
import shutil

import pandas as pd
from PIL import Image

from pipeline import paths
from pipeline.cli import main


def test_text_form_is_utf8_with_escaped_bytes():
    name = os.fsdecode(b"bad-\xff\xfe-name.jpg")
    assert not paths.is_utf8(name)
    assert paths.text_form(name) == "bad-\\xff\\xfe-name.jpg"
    assert paths.raw_bytes(name) == b"bad-\xff\xfe-name.jpg"
    assert paths.text_form("caf\u00e9.jpg") == "caf\u00e9.jpg" and paths.is_utf8("caf\u00e9.jpg")
    assert paths.clean_text(f"cannot open {name}") == "cannot open bad-\\xff\\xfe-name.jpg"


def _deep_dir(root, total_bytes: int):
    """A folder whose absolute path is longer than total_bytes, made one level at a time."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    length = len(os.fsencode(str(root)))
    depth = 0
    try:
        while length <= total_bytes:
            name = f"level{depth:03d}-" + "d" * 200
            os.mkdir(name, dir_fd=fd)
            nxt = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nxt
            length += len(name) + 1
            depth += 1
    except BaseException:
        os.close(fd)
        raise
    return fd, length


def test_run_with_a_non_utf8_name_and_a_5kb_path_exits_0_with_a_row_for_each(photo_paths, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    src = photo_paths[0]
    odd = os.path.join(os.fsencode(data), b"bad-\xff\xfe-name.jpg")
    shutil.copyfile(src, odd)
    Image.open(src).resize((240, 160)).save(data / "small-copy.png")
    fd, length = _deep_dir(data, 5000)
    try:
        with os.fdopen(os.open("deep.jpg", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd), "wb") as fh:
            fh.write(src.read_bytes())
    finally:
        os.close(fd)
    assert length > 5000
    out = tmp_path / "out"
    assert main(["dedupe", str(data), "--out", str(out), "--tiers", "verify", "--scheduler", "sync", "--quiet"]) == 0
    images = pd.read_parquet(out / "images.parquet")
    assert len(images) == 3
    bad = images[images["path"] == "bad-\\xff\\xfe-name.jpg"].iloc[0]
    assert bad["raw_path"] == b"bad-\xff\xfe-name.jpg" and pd.isna(bad["error"])
    assert bad["image_id"] == int.from_bytes(hashlib.blake2b(b"bad-\xff\xfe-name.jpg", digest_size=8).digest(),
                                             "big") >> 1
    deep = images[images["path"].str.endswith("/deep.jpg")].iloc[0]
    assert len(deep["path"]) > 4500 and pd.isna(deep["error"])  # read through folder fds, decoded
    assert deep["sha256"] == bad["sha256"]  # byte-identical: an exact pair
    pairs = pd.read_parquet(out / "pairs.parquet")
    assert ((pairs["rule"] == "exact_bytes") & pairs["is_duplicate"]).sum() == 1
    assert images["cluster_id"].notna().sum() >= 2
    data_js = (out / "report" / "data.js").read_text(encoding="utf-8")
    assert json.dumps("bad-\\xff\\xfe-name.jpg")[1:-1] in data_js  # the text form, JSON-escaped
    thumb = out / "report" / "thumbs" / f"{bad['image_id']}.jpg"
    assert thumb.is_file()  # the file behind the odd name was read for its thumbnail
