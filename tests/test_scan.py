import os

import pytest
from PIL import Image

from pipeline.config import ScanConfig
from pipeline.scan import batched, iter_files, sniff


def _jpeg(path, colour=(200, 10, 10)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 30), colour).save(path, "JPEG")


def test_walk_finds_images_by_content_and_lists_bad_ones(tmp_path):
    _jpeg(tmp_path / "a.jpg")
    _jpeg(tmp_path / "sub" / "deeper" / "b.jpeg")
    _jpeg(tmp_path / "no_extension")  # an image without an image extension: kept by its signature
    _jpeg(tmp_path / "photo.txt")  # mislabelled: kept by content
    (tmp_path / "notes.txt").write_text("hello")  # not an image, not claimed to be: ignored
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "fake.jpg").write_text("this is text, not a jpeg")
    _jpeg(tmp_path / ".hidden.jpg")
    _jpeg(tmp_path / ".cache" / "c.jpg")
    found = {e.path: e for e in iter_files(tmp_path, ScanConfig())}
    assert set(found) == {"a.jpg", "sub/deeper/b.jpeg", "no_extension", "photo.txt", "empty.png", "fake.jpg"}
    assert found["empty.png"].error == "empty file"
    assert "not an image" in found["fake.jpg"].error
    assert found["a.jpg"].error is None and found["a.jpg"].bytes == (tmp_path / "a.jpg").stat().st_size
    assert os.path.isabs(found["a.jpg"].abs_path)
    # hidden files are listed when asked
    shown = {e.path for e in iter_files(tmp_path, ScanConfig(skip_hidden=False))}
    assert ".hidden.jpg" in shown and ".cache/c.jpg" in shown


def test_symlinks_followed_without_loops(tmp_path):
    _jpeg(tmp_path / "real" / "x.jpg")
    os.symlink(tmp_path / "real", tmp_path / "link")  # same folder twice: visited once
    os.symlink(tmp_path, tmp_path / "real" / "loop")  # a loop back to the root
    os.symlink(tmp_path / "real" / "x.jpg", tmp_path / "alias.jpg")  # a linked file is listed
    os.symlink(tmp_path / "missing.jpg", tmp_path / "dangling.jpg")
    os.symlink(tmp_path / "itself.jpg", tmp_path / "itself.jpg")  # (a link to itself: a loop, said so)
    got = {e.path: e.error for e in iter_files(tmp_path, ScanConfig())}
    assert list(got) == ["alias.jpg", "dangling.jpg", "itself.jpg", "link/x.jpg"]  # sorted walk: "link" is reached before "real"
    assert got["alias.jpg"] is None and got["dangling.jpg"].startswith("cannot read: a link to a missing file")
    assert got["itself.jpg"] == "cannot read: a link that leads back to itself (a loop of links)"
    assert [e.path for e in iter_files(tmp_path, ScanConfig(follow_symlinks=False))] == ["real/x.jpg"]


def test_too_large_file_is_an_error_row(tmp_path):
    _jpeg(tmp_path / "big.jpg")
    (entry,) = iter_files(tmp_path, ScanConfig(max_file_bytes=10))
    assert entry.error.startswith("file too large")


def test_order_is_deterministic_and_batches_stream(tmp_path):
    for i in range(7):
        _jpeg(tmp_path / f"d{i % 3}" / f"{i}.jpg")
    first = [e.path for e in iter_files(tmp_path, ScanConfig())]
    assert first == [e.path for e in iter_files(tmp_path, ScanConfig())]
    sizes = [len(b) for b in batched(iter_files(tmp_path, ScanConfig()), 3)]
    assert sizes == [3, 3, 1]


def test_files_known_as_images_are_not_opened_again(tmp_path, monkeypatch):
    """`known_images` (a catalog's records) spares the first-bytes read of the files it vouches
    for, folder by folder in bounded batches; the listing is the one a full classification gives,
    and a vouched-for file over scan.max_file_bytes is still an error row."""
    import numpy as np

    from pipeline import scan
    for i in range(9):
        _jpeg(tmp_path / f"d{i % 2}" / f"{i}.jpg")
    (tmp_path / "d0" / "notes.txt").write_text("not an image")
    (tmp_path / "d1" / "fake.jpg").write_bytes(b"not an image either")
    want = [(e.path, e.bytes, e.error) for e in iter_files(tmp_path, ScanConfig())]
    opened, asked, classify = [], [], scan.classify
    monkeypatch.setattr(scan, "classify", lambda path, size, cfg: opened.append(os.path.basename(path))
                        or classify(path, size, cfg))
    monkeypatch.setattr(scan, "CLASSIFY_BATCH", 2)
    vouched = {f"d{i % 2}/{i}.jpg" for i in range(0, 9, 2)}

    def known_images(rels, sizes, mtime_ns):
        asked.append(len(rels))
        assert sizes.dtype == mtime_ns.dtype == np.int64 and (sizes > 0).all()
        return np.array([r in vouched for r in rels])

    got = [(e.path, e.bytes, e.error) for e in iter_files(tmp_path, ScanConfig(), known_images=known_images)]
    assert got == want
    assert sorted(opened) == sorted(["1.jpg", "3.jpg", "5.jpg", "7.jpg", "notes.txt", "fake.jpg"])
    assert max(asked) <= 2 and sum(asked) == 11  # (every regular file asked about once, two at a time)
    big = list(iter_files(tmp_path, ScanConfig(max_file_bytes=10), known_images=known_images))
    assert all(e.error and e.error.startswith("file too large") for e in big if e.path in vouched)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP", "PPM", "ICO"])
def test_sniff_recognises_pillow_formats(tmp_path, fmt):
    path = tmp_path / "x"
    Image.new("RGB", (16, 16), (1, 2, 3)).save(path, fmt)
    assert sniff(path.read_bytes()[:32]) is not None


def test_labelled_set_lists_mislabelled_and_corrupt_files(labelled_dir):
    root = labelled_dir / "imagededup_tests"
    found = {e.path: e for e in iter_files(root, ScanConfig())}
    assert len(found) == 34
    assert found["tests/data/formats_images/ukbench09380.svg"].error is None  # a JPEG named .svg
    assert found["tests/data/mixed_images/ukbench09268_corrupt.jpg"].error


def test_a_large_folder_is_listed_without_an_object_per_entry(tmp_path):
    """A folder's listing keeps names and flat arrays of stat fields, not a DirEntry and a stat
    result per file (~900 B a file, allocated all at once for a folder of 100k files, and the
    driver's long-lived objects made meanwhile kept the heap they left): the walk's traced peak
    stays under 400 B a file, with a 250-character name among them."""
    import tracemalloc
    folder = tmp_path / "flat"
    folder.mkdir()
    names = [f"photo_{i:05d}.jpg" for i in range(20_000)] + ["x" * 246 + ".jpg"]
    for name in reversed(names):
        (folder / name).write_bytes(b"")
    tracemalloc.start()
    try:
        first = []
        for entry in iter_files(folder, ScanConfig()):
            if len(first) < 3:
                first.append(entry.path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak / len(names) < 400, f"{peak / len(names):.0f} B a file"
    assert first == names[:3]


def test_the_listing_is_in_code_point_order_with_every_stat_field(tmp_path):
    """Every entry as os.stat gives it, in the order sorted() gives the names (upper before lower
    case, non-ASCII and undecodable names, whose bytes become surrogate escapes, after ASCII);
    a file dated after 2262 (its mtime_ns beyond 64 signed bits) is listed with its date in
    seconds and the largest int64 as its mtime_ns (`scan.mtime_ns_64`: the frames and the catalog
    keep them as int64)."""
    folder = tmp_path / "mixed"
    folder.mkdir()
    raw = [b"b.jpg", b"B.jpg", b"a.jpg", "\u00e9t\u00e9.jpg".encode(), "\U0001f600.jpg".encode(), b"\xff\xfe.jpg",
           b"a" * 250 + b".jpg", b"sub"]
    for name in raw:
        path = os.path.join(os.fsencode(folder), name)
        if name == b"sub":
            os.mkdir(path)
            _jpeg(folder / "sub" / "in.jpg")
        else:
            with open(path, "wb") as fh:
                fh.write(b"")
    late = 2**63 + 10**18  # ns: the year 2294
    os.utime(os.path.join(os.fsencode(folder), b"b.jpg"), ns=(late, late))
    got = list(iter_files(folder, ScanConfig()))
    # (a folder's files, then its subfolders: depth first)
    assert [e.path for e in got] == sorted(os.fsdecode(n) for n in raw if n != b"sub") + ["sub/in.jpg"]
    for e in got:
        st = os.stat(os.fsencode(e.abs_path))
        assert (e.bytes, e.mtime, e.mtime_ns) == (st.st_size, st.st_mtime, min(st.st_mtime_ns, 2**63 - 1)), e.path
    # (a filesystem whose dates end earlier, e.g. XFS without bigtime, clamps it: then the loop
    # above has checked what it keeps)
    if os.stat(folder / "b.jpg").st_mtime_ns == late:
        late_entry = next(e for e in got if e.path == "b.jpg")
        assert late_entry.mtime_ns == 2**63 - 1 and late_entry.mtime == late / 1e9


def test_entries_named_as_images_that_are_not_files_are_error_rows(tmp_path):
    """A dangling link (a share not mounted), a named pipe or a socket named as an image was left
    out unsaid; now each is a row whose error says what it is (one the catalog looks at again).
    Not named as an image, it is still left out, as any other file that is not one."""
    import socket
    folder = tmp_path / "data"
    folder.mkdir()
    _jpeg(folder / "photo.jpg")
    os.symlink("/nonexistent/share/IMG_0001.jpg", folder / "IMG_0001.jpg")
    os.symlink("/nonexistent/share/2023", folder / "2023")
    os.mkfifo(folder / "pipe.jpg")
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(folder / "sock.png"))
        got = {e.path: e.error for e in iter_files(folder, ScanConfig())}
    finally:
        sock.close()
    assert got["photo.jpg"] is None and "2023" not in got
    assert got["IMG_0001.jpg"].startswith("cannot read: a link to a missing file")
    assert got["pipe.jpg"] == got["sock.png"] == "cannot read: not a regular file (a pipe, socket or device)"
    assert list(got) == sorted(got)
    # (links not followed: left out, as any link then; the closed socket's file stays)
    assert {e.path for e in iter_files(folder, ScanConfig(follow_symlinks=False))} == {"photo.jpg", "pipe.jpg", "sock.png"}


def test_text_files_that_begin_like_bmp_or_pnm_are_not_images(tmp_path):
    """"BM" and "P1 " begin text too ("BMW service notes", "P1 meeting agenda"): such files were
    listed as broken images. A BMP needs its DIB header size, a PNM its width after the magic."""
    from pipeline.scan import sniff
    assert sniff(b"BMW service history: oil change 2021") is None
    assert sniff(b"P1 meeting agenda\n- budget\n") is None and sniff(b"P3 Sprint notes\n") is None
    assert sniff(b"P6\n# made by hand\n640 480\n255\n") == sniff(b"P5 12 7 255\n") == "PPM"
    assert sniff(b"P7\nWIDTH 4\nHEIGHT 2\nDEPTH 3\nMAXVAL 255\n") == "PPM"
    assert sniff(b"P7 332\n#XVVERSION:Version 2.28\n") == "PPM"  # (an XV thumbnail, which Pillow reads)
    for name in ("notes.txt", "agenda.md"):
        (tmp_path / name).write_bytes(b"BMW service history" if name == "notes.txt" else b"P1 meeting agenda\n")
    assert not list(iter_files(tmp_path, ScanConfig()))


def test_an_image_past_max_file_bytes_without_an_image_name_is_a_row(tmp_path):
    """A camera's extension-less IMG_0002 past scan.max_file_bytes was dropped unsaid (the size
    was checked before its first bytes); a big.jpg got a row."""
    _jpeg(tmp_path / "IMG_0002")
    _jpeg(tmp_path / "big.jpg")
    (tmp_path / "notes").write_bytes(b"x" * 5000)
    got = {e.path: e.error for e in iter_files(tmp_path, ScanConfig(max_file_bytes=100))}
    assert set(got) == {"IMG_0002", "big.jpg"} and all(e.startswith("file too large") for e in got.values())


def test_camera_raw_files_are_error_rows_not_their_previews(tmp_path):
    """Camera RAW files are recorded as errors, as the README says: most begin as a TIFF whose
    first picture is the camera's small preview, which was read as the photo (a 256-pixel TIFF
    paired with its camera JPEG, a plan removing the RAW as the smaller copy); ORF, RW2, RAF and
    CR3 were left out unsaid. A DNG is known by its tag whatever its name. A re-run with the
    catalog keeps them errors."""
    import pandas as pd
    from PIL import TiffImagePlugin

    from pipeline.cli import main
    from pipeline.scan import RAW_ERROR
    data = tmp_path / "data"
    data.mkdir()
    photo = Image.effect_mandelbrot((480, 320), (-2, -1, 1, 1), 80).convert("RGB")
    photo.save(data / "IMG_0001.jpg", quality=92)
    preview = photo.resize((240, 160))
    preview.save(data / "IMG_0001.NEF", format="TIFF")  # (a NEF's first directory: its preview)
    dng = TiffImagePlugin.ImageFileDirectory_v2()
    dng[50706] = b"\x01\x04\x00\x00"
    dng.tagtype[50706] = 1
    preview.save(data / "IMG_0002.dng", format="TIFF", tiffinfo=dng)
    preview.save(data / "exported.tif", format="TIFF", tiffinfo=dng)  # (a DNG named .tif)
    for name, head in (("P1010001", b"IIRO\x08\x00\x00\x00"), ("P1010002", b"IIU\x00\x08\x00\x00\x00"),
                       ("DSCF0001", b"FUJIFILMCCD-RAW 0201FF129502"), ("IMG_0003", b"\x00\x00\x00\x18ftypcrx ")):
        (data / name).write_bytes(head + bytes(4000))
    out = tmp_path / "out"
    for _ in range(2):  # (the second run: with the first one's catalog)
        assert main(["dedupe", str(data), "--out", str(out), "--tiers", "screen", "--scheduler", "sync",
                     "--quiet"]) == 0
        images = pd.read_parquet(out / "images.parquet").set_index("path")
        raw = ["IMG_0001.NEF", "IMG_0002.dng", "exported.tif", "P1010001", "P1010002", "DSCF0001", "IMG_0003"]
        assert sorted(images.index) == sorted(["IMG_0001.jpg", *raw])
        assert (images.loc[raw, "error"] == RAW_ERROR).all(), images["error"].to_dict()
        assert pd.isna(images.loc["IMG_0001.jpg", "error"]) and images["cluster_id"].isna().all()


def test_one_entry_that_refuses_a_look_leaves_its_folder_listed(tmp_path, monkeypatch):
    """A folder that may be read but not entered is named as not listed; one entry whose look-up
    alone is refused (another user's FUSE mount point, an ACL) in a folder this user can enter is
    skipped, the rest listed (a first version of the check dropped the whole folder). The refusal
    is raised by a stand-in for the entry: the tests may run as root."""
    import contextlib
    import errno
    from pipeline import paths
    (tmp_path / "sub").mkdir()
    (tmp_path / "mnt").mkdir()
    for path in (tmp_path / "a.png", tmp_path / "sub" / "b.png"):
        Image.new("RGB", (64, 48), (10, 90, 200)).save(path)

    class Refusing:
        def __init__(self, entry):
            self._entry, self.name, self.path = entry, entry.name, entry.path

        def is_symlink(self):
            return self._entry.is_symlink()

        def is_dir(self, **kw):
            return self._entry.is_dir(**kw)

        def stat(self, follow_symlinks=True):
            if self.name == "mnt":
                raise PermissionError(errno.EACCES, "Permission denied", self.path)
            return self._entry.stat(follow_symlinks=follow_symlinks)

    real = paths.scandir

    @contextlib.contextmanager
    def listing(path):
        with real(path) as it:
            yield (Refusing(e) for e in it)

    monkeypatch.setattr(paths, "scandir", listing)
    unlisted: list = []
    found = sorted(f.path for f in iter_files(tmp_path, ScanConfig(), unlisted=unlisted))
    assert found == ["a.png", "sub/b.png"] and unlisted == []
