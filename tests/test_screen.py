import io

import imagehash
import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageOps

from pipeline.config import ScreenConfig
from pipeline.decode import DIHEDRAL_INVERSE, dihedral, load_image
from pipeline.scan import FileEntry, iter_files
from pipeline.config import ScanConfig
from pipeline.screen import N_VARIANTS, TRIMMED, screen_partition, unpack_codes


def _entry(path):
    return FileEntry(path.name, str(path), path.stat().st_size, path.stat().st_mtime)


def _dist(hex_a, hex_b):
    return imagehash.hex_to_hash(hex_a) - imagehash.hex_to_hash(hex_b)


def test_hash_matches_imagehash_on_the_full_image(photo_paths):
    # the draft decode + small working copy must not change what aHash says about a photo
    cfg = ScreenConfig()
    rows = screen_partition([_entry(p) for p in photo_paths[:40]], cfg)
    for path, got in zip(photo_paths[:40], rows["hash"]):
        with Image.open(path) as im:
            ref = str(imagehash.average_hash(ImageOps.exif_transpose(im)))
        assert _dist(got, ref) <= 3, path.name


def test_row_fields_and_sha256(photo_paths):
    import hashlib
    path = photo_paths[0]
    (row,) = screen_partition([_entry(path)], ScreenConfig()).to_dict("records")
    assert row["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    with Image.open(path) as im:
        assert (row["width"], row["height"]) == im.size
    assert row["format"] == "JPEG" and pd.isna(row["error"]) and len(row["hash"]) == 16


def test_modes_are_canonicalised(tmp_path, photo_paths):
    base = Image.open(photo_paths[3]).convert("RGB")
    variants = {
        "p.png": base.convert("P"), "la.png": base.convert("LA"), "rgba.png": base.convert("RGBA"),
        "cmyk.jpg": base.convert("CMYK"), "l.jpg": base.convert("L"), "one.bmp": base.convert("1"),
        "i16.png": Image.fromarray((np.asarray(base.convert("L"), dtype=np.uint16) * 257)),
    }
    entries = []
    for name, img in variants.items():
        img.save(tmp_path / name)
        entries.append(_entry(tmp_path / name))
    rows = screen_partition(entries, ScreenConfig())
    assert rows["error"].isna().all(), rows[["path", "error"]]
    ref = str(imagehash.average_hash(base))
    for name, h in zip(rows["path"], rows["hash"]):
        assert _dist(h, ref) <= (12 if name == "one.bmp" else 4), name


def test_bad_files_get_errors_and_the_partition_goes_on(tmp_path, photo_paths):
    good = tmp_path / "good.jpg"
    good.write_bytes(photo_paths[0].read_bytes())
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(photo_paths[1].read_bytes()[:2000])
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 100)
    bomb = tmp_path / "bomb.png"
    Image.new("L", (3000, 3000)).save(bomb)
    rows = screen_partition([_entry(p) for p in (good, truncated, garbage, bomb)],
                            ScreenConfig(max_pixels=5_000_000)).set_index("path")
    assert pd.isna(rows.loc["good.jpg", "error"])
    assert "truncated" in rows.loc["truncated.jpg", "error"] or "decode" in rows.loc["truncated.jpg", "error"]
    assert rows.loc["garbage.png", "error"]
    assert "too large" in rows.loc["bomb.png", "error"]
    assert rows.loc["truncated.jpg", "sha256"]  # the bytes were read: the hash of the file is kept
    before = {p: p.read_bytes() for p in tmp_path.iterdir()}
    screen_partition([_entry(p) for p in tmp_path.iterdir()], ScreenConfig())
    assert before == {p: p.read_bytes() for p in tmp_path.iterdir()}  # inputs never modified


def test_exif_orientation_is_applied(tmp_path, photo_paths):
    upright = Image.open(photo_paths[5]).convert("RGB")
    entries = [_entry_with(tmp_path, "upright.jpg", upright, None)]
    # store the pixels turned the other way round, with the EXIF tag that turns them back
    for orientation, stored in ((3, upright.transpose(Image.Transpose.ROTATE_180)),
                                (6, upright.transpose(Image.Transpose.ROTATE_90)),
                                (8, upright.transpose(Image.Transpose.ROTATE_270))):
        entries.append(_entry_with(tmp_path, f"o{orientation}.jpg", stored, orientation))
    rows = screen_partition(entries, ScreenConfig())
    ref = rows["hash"].iloc[0]
    for row in rows.itertuples():
        assert (row.width, row.height) == upright.size, row.path
        assert _dist(row.hash, ref) <= 2, row.path


def _entry_with(tmp_path, name, img, orientation):
    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation
    img.save(tmp_path / name, "JPEG", quality=95, exif=exif.tobytes())
    return _entry(tmp_path / name)


def test_threatexchange_exif_photos_are_shown_upright(labelled_dir):
    # These four files are four shots of one desk, stored with EXIF orientation 1/3/6/8: after
    # orientation the 6 and 8 shots are portrait, the 1 and 3 shots landscape.
    root = labelled_dir / "threatexchange_pdq" / "pdq" / "data" / "reg-test-input" / "exif-rotn"
    rows = screen_partition(list(iter_files(root, ScanConfig())), ScreenConfig()).set_index("path")
    for name in ("exif-rotn-1.jpg", "exif-rotn-3.jpg"):
        assert rows.loc[name, "width"] > rows.loc[name, "height"]
    for name in ("exif-rotn-6.jpg", "exif-rotn-8.jpg"):
        assert rows.loc[name, "width"] < rows.loc[name, "height"]


def test_dihedral_variants_meet_mirrored_and_rotated_copies(tmp_path, photo_paths):
    img = Image.open(photo_paths[7]).convert("RGB")
    entries = [_entry_with(tmp_path, "orig.jpg", img, None)]
    for t in range(1, 8):
        entries.append(_entry_with(tmp_path, f"t{t}.jpg", dihedral(img, t), None))
    rows = screen_partition(entries, ScreenConfig())
    codes, mask = unpack_codes(rows, ScreenConfig())
    assert mask[:, :8].all()
    for t in range(1, 8):
        # variant t of the original == the plain hash of the copy transformed by t
        assert bin(int(codes[0, t, 0]) ^ int(codes[t, 0, 0])).count("1") <= 3, t
        # and the copy's inverse variant is back to the original
        assert bin(int(codes[t, DIHEDRAL_INVERSE[t], 0]) ^ int(codes[0, 0, 0])).count("1") <= 3, t


def test_trimmed_variant_undoes_letterbox(tmp_path, photo_paths):
    img = Image.open(photo_paths[9]).convert("RGB")
    w, h = img.size
    boxed = Image.new("RGB", (w, h + h // 2), (0, 0, 0))
    boxed.paste(img, (0, h // 4))
    entries = [_entry_with(tmp_path, "orig.jpg", img, None), _entry_with(tmp_path, "boxed.jpg", boxed, None)]
    rows = screen_partition(entries, ScreenConfig())
    codes, mask = unpack_codes(rows, ScreenConfig())
    plain = bin(int(codes[0, 0, 0]) ^ int(codes[1, 0, 0])).count("1")
    trimmed = bin(int(codes[0, 0, 0]) ^ int(codes[1, TRIMMED, 0])).count("1")
    assert mask[1, TRIMMED] and not mask[0, TRIMMED]
    assert trimmed <= 4 < plain


def test_other_hash_kinds_and_sizes(photo_paths):
    for kind in ("phash", "dhash", "whash"):
        rows = screen_partition([_entry(p) for p in photo_paths[:3]], ScreenConfig(hash=kind))
        assert rows["error"].isna().all() and rows["hash"].str.len().eq(16).all()
    cfg = ScreenConfig(hash_size=16)
    rows = screen_partition([_entry(p) for p in photo_paths[:3]], cfg)
    codes, _ = unpack_codes(rows, cfg)
    assert codes.shape == (3, N_VARIANTS, 4) and rows["hash"].str.len().eq(64).all()


def test_load_image_draft_keeps_min_side(photo_paths):
    img, full, fmt = load_image(photo_paths[0], min_side=100)
    assert min(img.size) >= 100 and max(img.size) < max(full) and fmt == "JPEG"
    with pytest.raises(Exception):
        load_image(io.BytesIO(b"not an image"))


def test_screened_rows_are_in_path_order_where_the_walk_is_not(tmp_path, photo_paths):
    """The walk lists a folder's files before its subfolders ("c.jpg" before "a/x.jpg"); the
    screen's frame is in path order, numbered from 0, image_id first."""
    from pipeline import run
    from pipeline.config import load_config
    from pipeline.progress import Progress
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.jpg").write_bytes(photo_paths[0].read_bytes())
    (tmp_path / "a-b.jpg").write_bytes(photo_paths[1].read_bytes())
    (tmp_path / "c.jpg").write_bytes(photo_paths[2].read_bytes())
    walked = [e.path for e in iter_files(tmp_path, ScanConfig())]
    assert walked == ["a-b.jpg", "c.jpg", "a/x.jpg"]
    cfg = load_config(None, ["dask.partition_size=1", "catalog=none"])
    images = run.run_screen(tmp_path, cfg, None, Progress(quiet=True))
    assert list(images["path"]) == ["a-b.jpg", "a/x.jpg", "c.jpg"]
    assert list(images.index) == [0, 1, 2] and images.columns[0] == "image_id"
    by_path = {e.path: e for e in iter_files(tmp_path, ScanConfig())}
    assert [by_path[p].bytes for p in images["path"]] == list(images["bytes"])
