"""A generated corpus of bad and odd input for the reliability suite (tests/test_reliability.py).

Each kind is one function that writes one or more files under a folder and says what the run must
make of them: `"ok"` (decoded, no error), `"error"` (a row with an error), `"skipped"` (no row:
hidden files, folders, links that lead nowhere or twice to the same place) or `"any"` (a row
either way: decodable or not depends on the optional codecs installed). `KINDS` is the list; the
suite asserts every kind and the docs count them.
"""
from __future__ import annotations

import io
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class Kind:
    name: str
    group: str  # names | paths | formats | bombs | sizes
    make: Callable[[Path], list[tuple[bytes, str]]]  # -> [(relative path bytes, expectation)]


def _photo(seed: int = 0, size=(96, 64)) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (size[1] // 8 + 1, size[0] // 8 + 1, 3), dtype=np.uint8)
    img = Image.fromarray(base).resize(size, Image.Resampling.BICUBIC)
    return img


def _jpeg_bytes(img: Image.Image | None = None, **kw) -> bytes:
    buf = io.BytesIO()
    (img or _photo()).save(buf, "JPEG", quality=90, **kw)
    return buf.getvalue()


def _png_bytes(img: Image.Image | None = None) -> bytes:
    buf = io.BytesIO()
    (img or _photo()).save(buf, "PNG")
    return buf.getvalue()


def _write(root: Path, rel: bytes, data: bytes) -> None:
    path = os.path.join(os.fsencode(root), rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(data)


def _file(rel: bytes | str, data: Callable[[], bytes], expect: str):
    rel_b = rel if isinstance(rel, bytes) else rel.encode("utf-8")

    def make(root: Path):
        _write(root, rel_b, data())
        return [(rel_b, expect)]
    return make


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height, with one tiny compressed row of data."""
    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + \
        chunk(b"IEND", b"")


def _png_bomb(width: int, height: int, rgb: bool = False) -> bytes:
    """A real, complete PNG of width x height black pixels (grey or RGB), compressed to a few KB."""
    row = b"\x00" + b"\x00" * width * (3 if rgb else 1)
    comp = zlib.compressobj(9)
    data = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2 if rgb else 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def _jpeg_claiming(width: int, height: int) -> bytes:
    """A JPEG whose SOF0 marker says width x height (the scan data is a tiny real image's)."""
    data = bytearray(_jpeg_bytes(_photo(size=(16, 16))))
    i = data.find(b"\xff\xc0")
    data[i + 5:i + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def _save(img: Image.Image, fmt: str, **kw) -> Callable[[], bytes]:
    def data() -> bytes:
        buf = io.BytesIO()
        img.save(buf, fmt, **kw)
        return buf.getvalue()
    return data


def _animated(fmt: str) -> Callable[[], bytes]:
    frames = [_photo(i) for i in range(3)]

    def data() -> bytes:
        buf = io.BytesIO()
        frames[0].save(buf, fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)
        return buf.getvalue()
    return data


def _exif_rotated() -> bytes:
    img = _photo(3)
    exif = Image.Exif()
    exif[0x0112] = 6
    return _jpeg_bytes(img, exif=exif.tobytes())


def _broken_exif() -> bytes:
    data = _jpeg_bytes()
    app1 = b"\xff\xe1" + struct.pack(">H", 20) + b"Exif\x00\x00" + b"MM\x00\x2a\xff\xff\xff\xff" + b"\x00" * 4
    return data[:2] + app1 + data[2:]


def _corrupt_middle() -> bytes:
    data = bytearray(_jpeg_bytes(_photo(5, (320, 240))))
    for i in range(len(data) // 3, len(data) // 3 + 400):
        data[i] = 0xFF if i % 2 else 0x00
    return bytes(data)


def _bad_crc_png() -> bytes:
    data = bytearray(_png_bytes())
    data[29] ^= 0xFF  # inside IHDR's CRC
    return bytes(data)


def _links(root: Path):
    _write(root, b"links/target.jpg", _jpeg_bytes(_photo(7)))
    os.symlink("target.jpg", os.path.join(root, "links", "alias.jpg"))
    os.symlink("missing.jpg", os.path.join(root, "links", "dangling.jpg"))
    os.symlink("..", os.path.join(root, "links", "loop"))
    # (a dangling link named as an image: a row saying so, e.g. a share not mounted)
    return [(b"links/target.jpg", "ok"), (b"links/alias.jpg", "ok"), (b"links/dangling.jpg", "error")]


def _folder_named_like_a_file(root: Path):
    _write(root, b"folder.jpg/inside.jpg", _jpeg_bytes(_photo(8)))
    return [(b"folder.jpg/inside.jpg", "ok")]


def _deep(root: Path):
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    rel = []
    try:
        while sum(len(p) + 1 for p in rel) + len(os.fsencode(str(root))) <= 5000:
            name = f"d{len(rel):03d}" + "x" * 200
            os.mkdir(name, dir_fd=fd)
            nxt = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nxt
            rel.append(name)
        with os.fdopen(os.open("deep.jpg", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd), "wb") as fh:
            fh.write(_jpeg_bytes(_photo(9)))
    finally:
        os.close(fd)
    return [("/".join(rel + ["deep.jpg"]).encode(), "ok")]


def _hidden(root: Path):
    _write(root, b".hidden.jpg", _jpeg_bytes())
    _write(root, b".cache/x.jpg", _jpeg_bytes())
    return [(b".hidden.jpg", "skipped"), (b".cache/x.jpg", "skipped")]


def _nfc_nfd(root: Path):
    _write(root, "unicode/caf\u00e9.jpg".encode(), _jpeg_bytes(_photo(11)))
    _write(root, "unicode/cafe\u0301.jpg".encode(), _jpeg_bytes(_photo(12)))
    return [("unicode/caf\u00e9.jpg".encode(), "ok"), ("unicode/cafe\u0301.jpg".encode(), "ok")]


def _rgba(alpha: int) -> Image.Image:
    img = _photo(13).convert("RGBA")
    img.putalpha(alpha)
    return img


def _float_tiff() -> bytes:
    arr = np.linspace(0, 1, 64 * 48, dtype=np.float32).reshape(48, 64)
    buf = io.BytesIO()
    Image.fromarray(arr, mode="F").save(buf, "TIFF")
    return buf.getvalue()


def _png16() -> bytes:
    arr = (np.linspace(0, 65535, 64 * 48).reshape(48, 64)).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def _multipage_tiff() -> bytes:
    buf = io.BytesIO()
    _photo(14).save(buf, "TIFF", save_all=True, append_images=[_photo(15)])
    return buf.getvalue()


def _zip() -> bytes:
    import zipfile
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("a.txt", "hello")
    return buf.getvalue()


def _twins(root: Path):
    data = _jpeg_bytes(_photo(27))
    _write(root, b"twins/one.jpg", data)
    _write(root, b"twins/two.jpg", data)
    return [(b"twins/one.jpg", "ok"), (b"twins/two.jpg", "ok")]


J, P = _jpeg_bytes, _png_bytes
KINDS: list[Kind] = [
    # names
    Kind("non-UTF-8 name", "names", _file(b"names/bad-\xff\xfe-name.jpg", J, "ok")),
    Kind("latin-1 name", "names", _file(b"names/caf\xe9.jpg", J, "ok")),
    Kind("spaces", "names", _file("names/my holiday photo.jpg", J, "ok")),
    Kind("leading dash", "names", _file("names/-rf.jpg", J, "ok")),
    Kind("newline in name", "names", _file("names/two\nlines.jpg", J, "ok")),
    Kind("tab in name", "names", _file("names/tab\there.jpg", J, "ok")),
    Kind("quotes", "names", _file("names/it's \"quoted\".jpg", J, "ok")),
    Kind("HTML in name", "names", _file("names/<script>alert(1)</script>.jpg", J, "ok")),
    Kind("shell metacharacters", "names", _file("names/$(rm -rf x);`id`|&.jpg", J, "ok")),
    Kind("backslash", "names", _file("names/back\\slash\\x41.jpg", J, "ok")),
    Kind("emoji", "names", _file("names/\U0001F4F7 photo.jpg", J, "ok")),
    Kind("right-to-left text", "names", _file("names/\u05e9\u05dc\u05d5\u05dd.jpg", J, "ok")),
    Kind("255-byte name", "names", _file(("names/" + "n" * 251 + ".jpg").encode(), J, "ok")),
    Kind("upper-case extension", "names", _file("names/UPPER.JPG", J, "ok")),
    Kind("no extension", "names", _file("names/noextension", J, "ok")),
    Kind("double extension", "names", _file("names/photo.jpg.png", J, "ok")),
    Kind("trailing dot and space", "names", _file("names/trailing. ", J, "ok")),
    Kind("NFC and NFD forms of one name", "names", _nfc_nfd),
    Kind("hidden file and folder", "names", _hidden),
    # paths and links
    Kind("path longer than PATH_MAX", "paths", _deep),
    Kind("symlinks: alias, dangling, loop", "paths", _links),
    Kind("folder named like an image", "paths", _folder_named_like_a_file),
    Kind("nested 20 levels", "paths", _file("/".join(f"n{i}" for i in range(20)) + "/deep.jpg", J, "ok")),
    # formats, good and odd
    Kind("progressive JPEG", "formats", _file("fmt/progressive.jpg", lambda: _jpeg_bytes(progressive=True), "ok")),
    Kind("EXIF orientation 6", "formats", _file("fmt/exif6.jpg", _exif_rotated, "ok")),
    Kind("broken EXIF block", "formats", _file("fmt/broken_exif.jpg", _broken_exif, "ok")),
    Kind("CMYK JPEG", "formats", _file("fmt/cmyk.jpg", _save(_photo(16).convert("CMYK"), "JPEG"), "ok")),
    Kind("greyscale JPEG", "formats", _file("fmt/grey.jpg", _save(_photo(17).convert("L"), "JPEG"), "ok")),
    Kind("palette PNG with transparency", "formats",
         _file("fmt/palette.png", _save(_rgba(128).convert("P"), "PNG", transparency=0), "ok")),
    Kind("fully transparent PNG", "formats", _file("fmt/transparent.png", _save(_rgba(0), "PNG"), "ok")),
    Kind("LA PNG", "formats", _file("fmt/la.png", _save(_photo(18).convert("LA"), "PNG"), "ok")),
    Kind("16-bit PNG", "formats", _file("fmt/png16.png", _png16, "ok")),
    Kind("float TIFF", "formats", _file("fmt/float.tif", _float_tiff, "any")),
    Kind("multi-page TIFF", "formats", _file("fmt/multipage.tif", _multipage_tiff, "ok")),
    Kind("animated GIF", "formats", _file("fmt/animated.gif", _animated("GIF"), "ok")),
    Kind("animated WebP", "formats", _file("fmt/animated.webp", _animated("WEBP"), "ok")),
    Kind("animated PNG", "formats", _file("fmt/animated.png", _animated("PNG"), "ok")),
    Kind("lossless WebP", "formats", _file("fmt/lossless.webp", _save(_photo(19), "WEBP", lossless=True), "ok")),
    Kind("BMP", "formats", _file("fmt/image.bmp", _save(_photo(20), "BMP"), "ok")),
    Kind("ICO", "formats", _file("fmt/icon.ico", _save(_photo(21, (64, 64)), "ICO"), "ok")),
    Kind("PPM", "formats", _file("fmt/image.ppm", _save(_photo(22), "PPM"), "ok")),
    Kind("PGM", "formats", _file("fmt/image.pgm", _save(_photo(23).convert("L"), "PPM"), "ok")),
    Kind("PBM", "formats", _file("fmt/image.pbm", _save(_photo(24).convert("1"), "PPM"), "ok")),
    Kind("TIFF 16-bit grey", "formats", _file("fmt/grey16.tif", _save(Image.fromarray(
        (np.arange(48 * 64).reshape(48, 64) * 20).astype(np.uint16)), "TIFF"), "ok")),
    Kind("1x1 image", "formats", _file("fmt/one.png", _save(Image.new("RGB", (1, 1), (1, 2, 3)), "PNG"), "ok")),
    Kind("1x4000 sliver", "formats", _file("fmt/sliver.png", _save(Image.new("RGB", (1, 4000), (9, 9, 9)), "PNG"), "ok")),
    Kind("all-black image", "formats", _file("fmt/black.png", _save(Image.new("RGB", (64, 64)), "PNG"), "ok")),
    Kind("all-white image", "formats", _file("fmt/white.jpg", _save(Image.new("RGB", (64, 64), "white"), "JPEG"), "ok")),
    Kind("noise image", "formats", _file("fmt/noise.png", _save(Image.fromarray(
        np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)), "PNG"), "ok")),
    Kind("PNG named .jpg", "formats", _file("fmt/png_named.jpg", P, "ok")),
    Kind("JPEG named .png", "formats", _file("fmt/jpeg_named.png", J, "ok")),
    Kind("GIF named .bmp", "formats", _file("fmt/gif_named.bmp", _save(_photo(25), "GIF"), "ok")),
    Kind("JPEG named .txt", "formats", _file("fmt/photo.txt", J, "ok")),
    Kind("WebP with alpha", "formats", _file("fmt/alpha.webp", _save(_rgba(100), "WEBP"), "ok")),
    Kind("GIF with transparency", "formats", _file("fmt/transparent.gif", _save(_rgba(0).convert("P"), "GIF",
                                                                                 transparency=0), "ok")),
    Kind("LZW-compressed TIFF", "formats", _file("fmt/lzw.tif", _save(_photo(26), "TIFF", compression="tiff_lzw"), "ok")),
    Kind("the same bytes under two names", "formats", _twins),
    # broken content
    Kind("empty .jpg", "broken", _file("bad/empty.jpg", lambda: b"", "error")),
    Kind("one byte .png", "broken", _file("bad/onebyte.png", lambda: b"\x89", "error")),
    Kind("JPEG signature only", "broken", _file("bad/signature.jpg", lambda: b"\xff\xd8\xff", "error")),
    Kind("truncated JPEG (half)", "broken", _file("bad/truncated.jpg", lambda: J()[: len(J()) // 2], "any")),
    Kind("truncated PNG (half)", "broken", _file("bad/truncated.png", lambda: P()[: len(P()) // 2], "error")),
    Kind("JPEG with corrupt middle", "broken", _file("bad/corrupt_middle.jpg", _corrupt_middle, "any")),
    Kind("PNG with a bad CRC", "broken", _file("bad/bad_crc.png", _bad_crc_png, "error")),
    Kind("text named .jpg", "broken", _file("bad/text.jpg", lambda: b"just some text\n" * 10, "error")),
    Kind("HTML named .png", "broken", _file("bad/page.png", lambda: b"<html><body>hi</body></html>", "error")),
    Kind("PDF named .jpg", "broken", _file("bad/doc.jpg", lambda: b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n", "error")),
    Kind("ZIP named .jpg", "broken", _file("bad/archive.jpg", _zip, "error")),
    Kind("SVG named .png", "broken", _file("bad/vector.png", lambda: b"<svg xmlns='http://www.w3.org/2000/svg'/>", "error")),
    Kind("random bytes .webp", "broken", _file("bad/random.webp", lambda: os.urandom(2048), "error")),
    Kind("RIFF header without WebP", "broken", _file("bad/riff.webp", lambda: b"RIFF\x10\x00\x00\x00WEBPVP8 " + b"\x00" * 8, "error")),
    Kind("TIFF header only", "broken", _file("bad/header.tif", lambda: b"II*\x00\x08\x00\x00\x00", "error")),
    Kind("GIF header only", "broken", _file("bad/header.gif", lambda: b"GIF89a\x10\x00\x10\x00", "error")),
    Kind("BMP header only", "broken", _file("bad/header.bmp", lambda: b"BM" + b"\x00" * 12, "error")),
    Kind("HEIC brand, no data", "broken", _file("bad/fake.heic", lambda: b"\x00\x00\x00\x18ftypheic" + b"\x00" * 12, "error")),
    Kind("zero-size PNG header", "broken", _file("bad/zero.png", lambda: _png_header_only(0, 0), "error")),
    Kind("PNG header, missing data", "broken", _file("bad/nodata.png", lambda: _png_header_only(300, 200), "error")),
    # bombs
    Kind("PNG claiming 100000x100000", "bombs", _file("bombs/huge_header.png", lambda: _png_header_only(100000, 100000), "error")),
    Kind("JPEG claiming 65000x65000", "bombs", _file("bombs/huge.jpg", lambda: _jpeg_claiming(65000, 65000), "error")),
    Kind("GIF with a 65535x65535 screen", "bombs", _file("bombs/screen.gif", lambda: b"GIF89a\xff\xff\xff\xff\x00\x00\x00" + b"," + b"\x00" * 4 + b"\x01\x00\x01\x00\x00\x02\x02D\x01\x00;", "error")),
    Kind("PNG bomb 14000x14000 grey (196 MP, under the pixel limit)", "bombs",
         _file("bombs/bomb196.png", lambda: _png_bomb(14000, 14000), "ok")),
    Kind("PNG bomb 12000x12000 RGB (576 MB to decode)", "bombs",
         _file("bombs/bomb_rgb.png", lambda: _png_bomb(12000, 12000, rgb=True), "error")),
    Kind("PNG bomb 20000x12000 (240 MP)", "bombs", _file("bombs/bomb240.png", lambda: _png_bomb(20000, 12000), "error")),
    # sizes
    Kind("file above scan.max_file_bytes", "sizes", _file("sizes/big.png", lambda: _png_bytes(Image.fromarray(
        np.random.default_rng(2).integers(0, 255, (700, 700, 3), dtype=np.uint8))), "error")),
]
