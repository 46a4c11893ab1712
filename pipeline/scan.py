"""Stage 1, scan: walk the folder tree and list the image files, streaming.

Files are kept when their first bytes carry an image signature (whatever their extension), or when
their extension says "image" (then a file whose content is not an image is still listed, with the
reason in `error`, so a mislabelled or empty file is never silently lost). Directories are read in
sorted order, so the listing (and every id derived from it) is deterministic. Symlinks are followed
once per real directory, which breaks loops. Nothing is opened for writing.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from pipeline import paths
from pipeline.config import ScanConfig

log = logging.getLogger("pipeline")

# (offset, magic bytes, format name). Enough to recognise what Pillow can decode.
SIGNATURES: list[tuple[int, bytes, str]] = [
    (0, b"\xff\xd8\xff", "JPEG"),
    (0, b"\x89PNG\r\n\x1a\n", "PNG"),
    (0, b"GIF87a", "GIF"),
    (0, b"GIF89a", "GIF"),
    (0, b"BM", "BMP"),
    (0, b"II*\x00", "TIFF"),
    (0, b"MM\x00*", "TIFF"),
    (0, b"II+\x00", "TIFF"),
    (0, b"MM\x00+", "TIFF"),
    (8, b"WEBP", "WEBP"),
    (0, b"\x00\x00\x01\x00", "ICO"),
    (0, b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG2000"),
    (0, b"\xff\x4f\xff\x51", "JPEG2000"),
    # ISO base media (HEIF family): the major brand after "ftyp"
    (4, b"ftypheic", "HEIF"),
    (4, b"ftypheix", "HEIF"),
    (4, b"ftypheim", "HEIF"),
    (4, b"ftypheis", "HEIF"),
    (4, b"ftyphevc", "HEIF"),
    (4, b"ftyphevx", "HEIF"),
    (4, b"ftypmif1", "HEIF"),
    (4, b"ftypmsf1", "HEIF"),
    (4, b"ftypavif", "AVIF"),
    (4, b"ftypavis", "AVIF"),
    # camera RAW formats with signatures of their own (the TIFF-based ones, CR2, NEF, ARW, DNG,
    # ..., begin as a TIFF: known by RAW_EXTENSIONS here, and a DNG by its tag when decoded)
    (0, b"IIRO", "RAW"),  # Olympus ORF
    (0, b"IIRS", "RAW"),
    (0, b"MMOR", "RAW"),
    (0, b"IIU\x00", "RAW"),  # Panasonic RW2
    (0, b"FUJIFILMCCD-RAW", "RAW"),  # Fujifilm RAF
    (4, b"ftypcrx ", "RAW"),  # Canon CR3
]
# camera RAW files are listed and recorded as errors, not read: most begin as a TIFF whose first
# picture is a small preview, which was taken for the photo (a 256-pixel "TIFF" paired with its
# camera JPEG, and a plan could remove the RAW as the smaller copy)
# (not ".raw": also disk images, audio, plain pixel dumps)
RAW_EXTENSIONS = frozenset({".3fr", ".ari", ".arw", ".bay", ".cr2", ".cr3", ".crw", ".dcr", ".dng", ".erf", ".fff",
                            ".iiq", ".k25", ".kdc", ".mef", ".mos", ".mrw", ".nef", ".nrw", ".orf", ".pef", ".raf",
                            ".rw2", ".rwl", ".sr2", ".srf", ".srw", ".x3f"})
RAW_ERROR = "camera RAW file: not read (RAW decoding is not supported; a JPEG or TIFF export of it is)"
_PNM = {b"P1", b"P2", b"P3", b"P4", b"P5", b"P6", b"P7"}
# a BMP's DIB header sizes (core, v2-v5, OS/2): "BM" alone is how "BMW notes.txt" begins too
_BMP_DIB_SIZES = {12, 16, 40, 52, 56, 64, 108, 124}
_PAM_KEYWORDS = (b"WIDTH", b"HEIGHT", b"DEPTH", b"MAXVAL", b"TUPLTYPE", b"ENDHDR")
SNIFF_BYTES = 32


# 64-bit nanoseconds hold dates from 1677-09-21 to 2262-04-11; a file dated outside them (a clock
# gone wrong, a copied archive) gets the nearest bound as its mtime_ns, which the frames and the
# catalog keep as int64 (it failed the run), and is never taken as unchanged on it
# (`mtime_ns_exact`); its outputs' mtime comes from the seconds
MTIME_NS_MIN, MTIME_NS_MAX = -2 ** 63, 2 ** 63 - 1


def mtime_ns_64(ns: int) -> int:
    """`ns` clamped into int64 (see MTIME_NS_MIN)."""
    return min(max(int(ns), MTIME_NS_MIN), MTIME_NS_MAX)


def mtime_ns_exact(ns):
    """Is the mtime_ns the file's own (not a clamped bound)? Works on numbers and numpy arrays."""
    return (ns > MTIME_NS_MIN) & (ns < MTIME_NS_MAX)


@dataclass(frozen=True)
class FileEntry:
    path: str  # relative to the scanned root, POSIX separators
    abs_path: str
    bytes: int
    mtime: float
    error: str | None = None  # set when the file is listed but cannot be an image
    mtime_ns: int = 0  # modification time in integer nanoseconds (what the catalog compares; `mtime_ns_64`)
    etag: str | None = None  # an object's entity tag from the store's listing (None for a local file)


def sniff(head: bytes) -> str | None:
    """Image format name from the first bytes, or None."""
    for offset, magic, name in SIGNATURES:
        if head[offset:offset + len(magic)] == magic:
            if name == "WEBP" and head[:4] != b"RIFF":
                continue
            if name == "BMP" and (len(head) < 18 or int.from_bytes(head[14:18], "little") not in _BMP_DIB_SIZES):
                continue
            return name
    if head[:2] in _PNM and len(head) > 2 and head[2:3] in (b" ", b"\n", b"\r", b"\t", b"#"):
        # then a comment, the width, or (P7) a header keyword: "P1 meeting agenda" is text
        rest = head[2:].lstrip(b" \n\r\t")
        if not rest or rest[:1] == b"#" or rest[:1].isdigit() or (head[:2] == b"P7" and rest.startswith(_PAM_KEYWORDS)):
            return "PPM"
    return None


def classify(abs_path: str, size: int, cfg: ScanConfig) -> tuple[bool, str | None]:
    """(keep?, error) for one regular file: kept when its name or its first bytes say image."""
    ext = os.path.splitext(abs_path)[1].lower()
    if ext in RAW_EXTENSIONS:  # (not opened)
        return True, RAW_ERROR
    ext_is_image = ext in cfg.image_extensions
    too_large = f"file too large: {size} bytes exceeds scan.max_file_bytes={cfg.max_file_bytes}"
    if size > cfg.max_file_bytes and ext_is_image:
        return True, too_large  # (not opened)
    try:
        with paths.open_bytes(abs_path) as fh:
            head = fh.read(SNIFF_BYTES)
    except OSError as exc:  # (a name without an extension may be an image too: IMG_0002 went unsaid)
        return ext_is_image or not ext, f"cannot read: {exc.strerror or exc}"
    if size > cfg.max_file_bytes:  # (an image by its bytes alone, e.g. IMG_0002: it was dropped unsaid)
        return sniff(head) is not None, too_large
    found = sniff(head)
    if found == "RAW":
        return True, RAW_ERROR
    if found:
        return True, None
    if not ext_is_image:
        return False, None
    if size == 0:
        return True, "empty file"
    return True, "not an image: content matches no known image format"


# regular files of a folder classified together (a catalog lookup each), so a folder of a
# million files holds a bounded list of them at a time
CLASSIFY_BATCH = 4096


def iter_files(root: str | Path, cfg: ScanConfig, skip: Sequence[str | os.PathLike] = (),
               unlisted: list[tuple[str, str]] | None = None,
               known_images: Callable[[list[str], np.ndarray, np.ndarray], np.ndarray] | None = None,
               skip_holding: Sequence[str] = (),
               ) -> Iterator[FileEntry]:
    """Yield every image file under `root` (depth-first, sorted), one at a time. `skip`: folders
    not to go into (the run's own OUT, catalog and work folder when they lie inside DATA), known
    by device and inode, so a symlink or another spelling of them is skipped too. `skip_holding`:
    names of files that mark a folder not to go into either (another run's OUT or catalog: its
    report's thumbnails were scanned as images and paired with their originals); each such folder
    is logged. `unlisted` receives (folder relative to root, why) for each folder that could not
    be listed.

    `known_images(rels, sizes, mtime_ns)`: True for the files known to be images as they are (a
    catalog's records without error, same size and mtime_ns): their first bytes are not read
    again (an open and a read per file, ~30 us on a local disk and a round trip on a network
    one, for every file of a nightly run over an unchanged collection)."""
    root_abs = os.path.abspath(root)
    seen_dirs: set[tuple[int, int]] = set()
    for folder in skip:  # (one not made yet holds nothing to skip)
        with contextlib.suppress(OSError):
            st = os.stat(folder)
            seen_dirs.add((st.st_dev, st.st_ino))
    st = os.stat(root_abs)
    seen_dirs.add((st.st_dev, st.st_ino))
    stack: list[tuple[str, str]] = [(root_abs, "")]
    while stack:
        dir_abs, dir_rel = stack.pop()
        listed = _listing(dir_abs, cfg)
        if isinstance(listed, OSError):  # unreadable folder: nothing inside it can be listed
            if unlisted is not None:
                unlisted.append((dir_rel or ".", listed.strerror or str(listed)))
            continue
        names, fields, mtimes, odd = listed
        clashes = _same_text(names)
        if clashes and unlisted is not None:
            for i, text in sorted(clashes.items(), key=lambda c: c[1]):
                unlisted.append((paths.text_form(f"{dir_rel}/{names[i]}" if dir_rel else names[i]),
                                 f"its name is not valid UTF-8 and its text form {text!r} is another entry's "
                                 "name in its folder (the outputs name files by that text): rename one"))
        subdirs = []
        # (in code-point order, as sorted() gives: an object array compares the names themselves)
        order = np.argsort(np.array(names, dtype=object), kind="stable") if names else np.zeros(0, np.int64)
        for start in range(0, len(order), CLASSIFY_BATCH):
            files = []  # (entry number, rel, path, size, mtime_ns, error) of the regular files (error None)
            for i in order[start:start + CLASSIFY_BATCH]:  # and of others named as images (`_not_a_file`)
                if i in clashes:
                    continue
                name = names[i]
                mode, size, mtime_ns, dev, ino = odd[i] if i in odd else fields[5 * i:5 * i + 5]
                rel = f"{dir_rel}/{name}" if dir_rel else name
                path = os.path.join(dir_abs, name)
                if stat.S_ISDIR(mode):
                    key = (dev, ino)
                    if key in seen_dirs:
                        continue  # symlink loop or a folder reached twice
                    seen_dirs.add(key)
                    marker = next((m for m in skip_holding if os.path.lexists(os.path.join(path, m))), None)
                    if marker is not None:
                        log.info("not scanned: %s (it holds %s: another run's output or catalog)",
                                 paths.text_form(rel), marker)
                        continue
                    subdirs.append((path, rel))
                elif stat.S_ISREG(mode):
                    files.append((i, rel, path, size, mtime_ns, None))
                elif os.path.splitext(name)[1].lower() in cfg.image_extensions:
                    files.append((i, rel, path, 0, mtime_ns, _not_a_file(mode, path)))
            seen = np.zeros(len(files), bool)
            # (odd: past 64 bits, no record's)
            # (a RAW file is classified each time: a catalog may hold one read as its TIFF preview)
            plain = [j for j, f in enumerate(files) if f[0] not in odd and f[5] is None
                     and os.path.splitext(f[1])[1].lower() not in RAW_EXTENSIONS]
            if known_images is not None and plain:
                seen[plain] = known_images([files[j][1] for j in plain], np.array([files[j][3] for j in plain], np.int64),
                                           np.array([files[j][4] for j in plain], np.int64))
            for (i, rel, path, size, mtime_ns, error), image in zip(files, seen):
                # (a known image passed the sniff when its record was made: the same bytes pass it)
                keep, error = (True, error) if error else \
                    (True, None) if image and size <= cfg.max_file_bytes else classify(path, size, cfg)
                if keep:
                    yield FileEntry(rel, path, size, mtimes[i], error, mtime_ns_64(mtime_ns))
        stack.extend(reversed(subdirs))


def _same_text(names: list[str]) -> dict[int, str]:
    """Entry number -> text form of the entries whose name is not valid UTF-8 and whose text form
    (`paths.text_form`, `\\xNN` for each bad byte) is another entry's name in the folder, or
    another such name's text (b"x\\xff.jpg" and a valid "x\\\\xff.jpg" both read x\\xff.jpg). The
    outputs and the catalog name files by that text: two files of one text broke every catalog
    re-run. The valid name, or else the first in code-point order, is kept."""
    bad = [i for i, n in enumerate(names) if not n.isascii() and not paths.is_utf8(n)]
    if not bad:
        return {}
    taken = {n for n in names if n.isascii() or paths.is_utf8(n)}
    clashes = {}
    for i in sorted(bad, key=lambda i: names[i]):
        text = paths.text_form(names[i])
        if text in taken:
            clashes[i] = text
        taken.add(text)
    return clashes


def _not_a_file(mode: int, path) -> str:
    """The error row of an entry named as an image that is not a file: a link whose target is
    gone (a share not mounted, a moved folder), a loop of links, or a pipe, socket or device (it
    was left out unsaid). "cannot read": a catalog looks again at the next run."""
    if stat.S_ISLNK(mode):
        try:
            paths.stat(path)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                return "cannot read: a link that leads back to itself (a loop of links)"
        return "cannot read: a link to a missing file (its target is gone or cannot be reached)"
    return "cannot read: not a regular file (a pipe, socket or device)"


def enterable(folder: str) -> bool:
    """Can this user look up names in `folder` (execute permission)? Its own `.` is looked up
    through it. A folder whose path is too long to take here counts as enterable."""
    try:
        os.stat(os.path.join(folder, "."))
    except PermissionError:
        return False
    except OSError:
        return True
    return True


def _listing(dir_abs: str, cfg: ScanConfig) -> tuple[list[str], array, array, dict] | OSError:
    """A folder's entries to walk, in the order listed: their names, their stat fields as flat
    arrays (mode, size, mtime_ns, st_dev, st_ino per entry; mtime) and, by entry number, the
    fields of an entry that does not fit 64 signed bits (a date after 2262, an odd inode number),
    or the error that kept the folder from being listed. Flat arrays, not an entry and a stat
    object per file: a folder of 100k files held ~100 MB of them at once, and the objects the
    driver keeps meanwhile (the screen's results arriving) were placed between them, so much of
    that heap stayed taken after they were freed."""
    names: list[str] = []
    fields, mtimes = array("q"), array("d")
    odd: dict[int, tuple[int, int, int, int, int]] = {}
    try:
        # stat while the folder is open: a folder deeper than PATH_MAX is read through its fd
        with paths.scandir(dir_abs) as it:
            for entry in it:
                if cfg.skip_hidden and entry.name.startswith("."):
                    continue
                try:
                    if entry.is_symlink() and not cfg.follow_symlinks:
                        continue
                    st = entry.stat(follow_symlinks=True)
                except OSError:
                    try:  # a dangling link: listed by its own fields (`_not_a_file`)
                        st = entry.stat(follow_symlinks=False)
                    except PermissionError as exc:
                        if not enterable(dir_abs):  # (read permission without execute: no entry in
                            return exc               # the folder can be looked at)
                        continue  # one entry that refuses it (another user's FUSE mount, an ACL)
                    except OSError:
                        continue  # an entry gone since the listing
                    if not stat.S_ISLNK(st.st_mode):
                        continue
                values = (st.st_mode, st.st_size, st.st_mtime_ns, st.st_dev, st.st_ino)
                try:
                    fields.extend(array("q", values))  # (all five or none)
                except OverflowError:
                    odd[len(names)] = values
                    fields.extend((0, 0, 0, 0, 0))
                names.append(entry.name)
                mtimes.append(st.st_mtime)
    except OSError as exc:
        return exc
    return names, fields, mtimes, odd


def changed_since(abs_paths, sizes, mtimes) -> list[bool]:
    """For each file: True when it is gone or its size or mtime differ from what the scan and
    screen recorded (it was rewritten while the run went on, so its features may mix versions)."""
    flags = []
    for path, size, mtime in zip(abs_paths, sizes, mtimes):
        try:
            st = paths.stat(path)
        except OSError:
            flags.append(True)
            continue
        flags.append(st.st_size != size or st.st_mtime != mtime)
    return flags


# a tier's failure for a file rewritten after the screen read it (catalog.TRIED_AGAIN: read again)
CHANGED_SINCE_SCREEN = "changed during the run: the file was rewritten after the screen read it (size or mtime differ)"


def rewritten(path, size, mtime_ns) -> bool:
    """Is a local file gone, or of another size or mtime_ns than the screen saw (`size`,
    `mtime_ns`)? What a tier makes of it may be of bytes other than those its sha256 names: the
    catalog would keep it under that sha256, for whichever file has those bytes at a later run."""
    try:
        st = paths.stat(path)
    except FileNotFoundError:
        return True
    except OSError:  # (cannot tell: the tier's own read says what is wrong)
        return False
    return st.st_size != int(size) or mtime_ns_64(st.st_mtime_ns) != int(mtime_ns)


def batched(entries: Iterator[FileEntry], size: int) -> Iterator[list[FileEntry]]:
    """Group the stream into partitions of `size` files without listing everything first."""
    batch: list[FileEntry] = []
    for entry in entries:
        batch.append(entry)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch
