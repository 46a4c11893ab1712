"""File names as the filesystem holds them: any bytes, any length.

Two things a folder tree can hold that plain `open(path)` and UTF-8 text cannot:

* **Names that are not valid UTF-8** (old NAS shares, USB sticks, archives from other locales).
  Python hands them over as `str` with the bad bytes as lone surrogates (PEP 383); those cannot be
  written to Parquet or HTML. `text_form` is the documented text: the name's bytes decoded as UTF-8
  with every undecodable byte written as `\\xNN`; `raw_bytes` keeps the exact bytes for the
  `raw_path` column (null when the name is valid UTF-8), so nothing is lost.
* **Paths longer than PATH_MAX** (4096 bytes on Linux, reached by deep nesting). The kernel refuses
  them whole, but opens them one folder at a time: `open_bytes` and `scandir` walk such a path with
  directory file descriptors.
"""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Iterator

# Longer paths are opened component by component (PATH_MAX is 4096 with the final NUL; a little
# margin for the kernel's own additions).
LONG_PATH_BYTES = 4000


def raw_bytes(name: str | bytes) -> bytes:
    """The exact bytes of a name Python got from the filesystem."""
    return os.fsencode(name)


def text_form(name: str | bytes) -> str:
    """Lossless-enough text for outputs: UTF-8, undecodable bytes as `\\xNN` (see `raw_bytes`)."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


_CONTROL = {c: f"\\x{c:02x}" for c in [*range(0x20), *range(0x7f, 0xa0)]}


def shown(text) -> str:
    """Text quoting a file name, for a terminal: its control characters as `\\xNN` (a name's
    escape sequences rewrote the lines printed before it, and a newline forged a line of its own)."""
    return str(text).translate(_CONTROL)


def from_text_form(text: str) -> str:
    """The name `text_form` wrote as `text`, as the os functions take it: each `\\xNN` back to
    that byte. Ambiguous for a valid name that holds a backslash, an x and two hex digits: a
    caller tries the text as it is first (`text_form` writes lowercase hex)."""
    import re
    raw = re.sub(rb"\\x([0-9a-f]{2})", lambda m: bytes([int(m.group(1), 16)]), text.encode("utf-8", "surrogateescape"))
    return os.fsdecode(raw)


@functools.lru_cache(maxsize=64)
def os_folder(text: str) -> str:
    """The folder whose path the outputs hold as `text` (its `text_form`), as the operating system
    names it: the text itself, or, when that names no folder and the text has `\\xNN` escapes,
    the folder with those bytes (a scanned folder whose own path is not UTF-8)."""
    if "\\x" not in text or os.path.isdir(text):
        return text
    other = from_text_form(text)
    return other if os.path.isdir(other) else text


def os_file(text: str) -> str | bytes:
    """The file whose path the outputs (or a catalog) hold as `text`: the text itself, or, when
    that names nothing and the text has `\\xNN` escapes, the name with those bytes, as the
    stages' frames carry such a name (`internal`: bytes)."""
    if "\\x" not in text or os.path.lexists(text):
        return text
    return internal(from_text_form(text))


def os_name(abs_path: str, path: str, raw: bytes | None = None) -> str:
    """A file as the operating system names it, from the outputs' texts: `abs_path` (the scanned
    folder's path joined with `path`, both text forms), `path`, and `raw`, the name's exact bytes
    under the folder when it is not UTF-8 (images.parquet's raw_path). An `abs_path` that does not
    end with `path` (e.g. a run's own, already the os name: a str, or bytes) is returned as it is."""
    if not isinstance(abs_path, str) or not abs_path.endswith(path):
        return abs_path
    root = os_folder(abs_path[:len(abs_path) - len(path)])
    if not isinstance(raw, (bytes, bytearray)):
        return root + path
    return os.fsdecode(os.fsencode(root) + bytes(raw))


def is_utf8(name: str | bytes) -> bool:
    try:
        name.decode("utf-8") if isinstance(name, bytes) else name.encode("utf-8")
    except UnicodeError:
        return False
    return True


def internal(name: str) -> str | bytes:
    """How a name travels through the stages' frames: as str when it is valid UTF-8, else as its
    bytes (pandas and Arrow cannot hold the lone surrogates Python uses for undecodable bytes;
    `open`, `os.stat` and `open_bytes` take bytes paths as they are)."""
    return name if is_utf8(name) else os.fsencode(name)


def clean_text(value: str | None) -> str | None:
    """Any text that may quote a file name (an error message) made writable as UTF-8."""
    if value is None or is_utf8(value):
        return value
    return value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def is_long(path: str | bytes) -> bool:
    return len(os.fsencode(path)) >= LONG_PATH_BYTES


def _open_dir_chain(path: str) -> int:
    """A directory fd for an absolute path of any length, opened one component at a time."""
    parts = [p for p in os.fsencode(path).split(b"/") if p]
    fd = os.open(b"/", os.O_RDONLY | os.O_DIRECTORY)
    try:
        for part in parts:
            nxt = os.open(part, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nxt
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_bytes(path: str | bytes):
    """`open(path, "rb")` for a path of any length (str or bytes)."""
    if not is_long(path):
        return open(path, "rb")
    parent, name = os.path.split(os.path.abspath(path))
    dir_fd = _open_dir_chain(parent)
    try:
        fd = os.open(name, os.O_RDONLY, dir_fd=dir_fd)
    finally:
        os.close(dir_fd)
    return os.fdopen(fd, "rb")


def stat(path: str | bytes) -> os.stat_result:
    """`os.stat(path)` for a path of any length."""
    if not is_long(path):
        return os.stat(path)
    parent, name = os.path.split(os.path.abspath(os.fsencode(path)))
    dir_fd = _open_dir_chain(os.fsdecode(parent))
    try:
        return os.stat(name, dir_fd=dir_fd)
    finally:
        os.close(dir_fd)


@contextlib.contextmanager
def scandir(path: str) -> Iterator[Iterator[os.DirEntry]]:
    """`os.scandir(path)` for a folder whose entries' paths may exceed PATH_MAX. Then the folder
    is read through its fd: entries have only their name in `.path` (callers join names
    themselves) and `.stat()` works relative to the fd, whatever the path's length."""
    if len(os.fsencode(path)) + 257 < LONG_PATH_BYTES:  # + "/" + the longest name (255)
        with os.scandir(path) as it:
            yield it
        return
    fd = _open_dir_chain(os.path.abspath(path))
    try:
        with os.scandir(fd) as it:
            yield it
    finally:
        os.close(fd)
