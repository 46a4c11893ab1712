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
    paths = [e.path for e in iter_files(tmp_path, ScanConfig())]
    assert paths == ["alias.jpg", "link/x.jpg"]  # sorted walk: "link" is reached before "real"
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
    stays under 400 B a file, and the entries are the same, in name order, as os.stat gives."""
    import tracemalloc
    folder = tmp_path / "flat"
    folder.mkdir()
    names = [f"photo_{i:05d}.jpg" for i in range(20_000)]
    for name in reversed(names):
        (folder / name).write_bytes(b"")
    tracemalloc.start()
    try:
        found = []
        for entry in iter_files(folder, ScanConfig()):
            if len(found) < 3:
                found.append(entry)
        n = len(names)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak / n < 400, f"{peak / n:.0f} B a file"
    assert [e.path for e in found] == names[:3]
    st = os.stat(folder / names[0])
    assert (found[0].bytes, found[0].mtime, found[0].mtime_ns, found[0].error) == \
        (st.st_size, st.st_mtime, st.st_mtime_ns, "empty file")
