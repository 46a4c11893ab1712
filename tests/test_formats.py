"""Every photo format the decoder promises, written here from a real photo and hashed like the
screen does: each must land within a few bits of the original JPEG's hash, and one photo saved
in eight formats must end up in one cluster."""
from __future__ import annotations

import io
import struct

import cv2
import numpy as np
import pandas as pd
import pillow_heif
import pytest
from PIL import Image, ImageCms, features

from pipeline import decode
from pipeline.config import ScreenConfig, load_config
from pipeline.decode import DecodeError, load_image
from pipeline.screen import image_hashes

# a re-encode moves an aHash by 0-2 bits; 4 is screen.dihedral_max_distance, far below the
# 10-bit candidate distance and far from unrelated photos (~32)
CLOSE = 4


@pytest.fixture(scope="module")
def photos(photo_paths):
    """Two real photos (the second is a different picture, for multi-frame files)."""
    return [Image.open(p).convert("RGB") for p in photo_paths[:2]]


@pytest.fixture(scope="module")
def photo(photos):
    return photos[0]


def hash_of(source) -> np.ndarray:
    img, _, _ = load_image(source, min_side=256)
    return image_hashes(img, ScreenConfig())[0][0]


def distance(a: np.ndarray, b: np.ndarray) -> int:
    return int(sum(bin(int(x) ^ int(y)).count("1") for x, y in zip(a, b)))


def jpeg_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=92, **kw)
    return buf.getvalue()


def saved(img: Image.Image, fmt: str, **kw) -> io.BytesIO:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return io.BytesIO(buf.getvalue())


def heic_10bit(img: Image.Image) -> bytes:
    """A 10-bit HEIC: pillow-heif stores 16-bit input as 10 bits."""
    data = (np.asarray(img, dtype=np.uint16) * 257).tobytes()
    heif = pillow_heif.from_bytes(mode="RGB;16", size=img.size, data=data)
    buf = io.BytesIO()
    heif.save(buf, quality=85)
    return buf.getvalue()


# -- ICC helpers: an Adobe RGB (1998) matrix/TRC profile written byte by byte (ImageCms can only
# create sRGB, LAB and XYZ profiles itself)

def _s15(x: float) -> bytes:
    return struct.pack(">i", round(x * 65536))


def _xyz(x, y, z) -> bytes:
    return b"XYZ \0\0\0\0" + _s15(x) + _s15(y) + _s15(z)


def adobe_rgb_profile() -> bytes:
    """ICC v2 display profile: Adobe RGB primaries (D50-adapted colorants), gamma 563/256."""
    desc_text = b"Adobe RGB test profile\0"
    desc = (b"desc\0\0\0\0" + struct.pack(">I", len(desc_text)) + desc_text
            + b"\0" * 8 + b"\0" * 3 + b"\0" * 67)  # no Unicode, no ScriptCode description
    trc = b"curv\0\0\0\0" + struct.pack(">IH", 1, 563) + b"\0\0"
    tags = [(b"desc", desc), (b"wtpt", _xyz(0.9642, 1.0, 0.8249)), (b"cprt", b"text\0\0\0\0none\0\0\0\0"),
            (b"rXYZ", _xyz(0.6097559, 0.3111145, 0.0194702)), (b"gXYZ", _xyz(0.2052401, 0.6256561, 0.0608902)),
            (b"bXYZ", _xyz(0.1492240, 0.0632141, 0.7445396)), (b"rTRC", trc), (b"gTRC", trc), (b"bTRC", trc)]
    offset = 128 + 4 + 12 * len(tags)
    table, body = b"", b""
    for sig, data in tags:
        table += sig + struct.pack(">II", offset + len(body), len(data))
        body += data + b"\0" * (-len(data) % 4)
    size = offset + len(body)
    header = (struct.pack(">I", size) + b"none" + bytes([2, 0x10, 0, 0]) + b"mntrRGB XYZ "
              + struct.pack(">6H", 2024, 1, 1, 0, 0, 0) + b"acsp" + b"\0" * 24 + struct.pack(">I", 0)
              + _s15(0.9642) + _s15(1.0) + _s15(0.8249) + b"\0" * 48)
    assert len(header) == 128
    return header + struct.pack(">I", len(tags)) + table + body


def to_profile(img: Image.Image, icc: bytes) -> Image.Image:
    srgb = ImageCms.createProfile("sRGB")
    return ImageCms.profileToProfile(img, srgb, ImageCms.ImageCmsProfile(io.BytesIO(icc)), outputMode="RGB")


# ---------------------------------------------------------------------------------------------

def test_heic_8_and_10_bit_decode_close_to_the_original(photo):
    original = hash_of(io.BytesIO(jpeg_bytes(photo)))
    heic8 = saved(photo, "HEIF", quality=85)
    heic10 = io.BytesIO(heic_10bit(photo))
    assert Image.open(heic8).info["bit_depth"] == 8 and Image.open(heic10).info["bit_depth"] == 10
    for data in (heic8, heic10):
        data.seek(0)
        img, size, fmt = load_image(data)
        assert fmt == "HEIF" and img.mode == "RGB" and size == photo.size
        # pixels, not just the hash: HEVC at quality 85 stays within a few levels on average
        assert np.abs(np.asarray(img, float) - np.asarray(photo, float)).mean() < 6
        data.seek(0)
        assert distance(hash_of(data), original) <= CLOSE


def test_heic_orientation_is_applied(photo):
    # a camera stores the sensor's pixels plus "rotate 90"; the decoded image must be upright
    original = hash_of(io.BytesIO(jpeg_bytes(photo)))
    stored = photo.transpose(Image.Transpose.ROTATE_90)  # what the sensor wrote
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 clockwise to display
    data = saved(stored, "HEIF", quality=85, exif=exif.tobytes())
    img, size, _ = load_image(data)
    assert img.size == size == photo.size
    data.seek(0)
    assert distance(hash_of(data), original) <= CLOSE


def test_heic_icc_profile_is_converted_to_srgb(photo):
    icc = adobe_rgb_profile()
    data = saved(to_profile(photo, icc), "HEIF", quality=90, icc_profile=icc)
    assert Image.open(data).info.get("icc_profile") == icc
    data.seek(0)
    img, _, _ = load_image(data)
    assert np.abs(np.asarray(img, float) - np.asarray(photo, float)).mean() < 5


@pytest.mark.skipif(not features.check("avif"), reason="this Pillow has no AVIF plugin")
def test_avif(photo):
    original = hash_of(io.BytesIO(jpeg_bytes(photo)))
    img, size, fmt = load_image(saved(photo, "AVIF", quality=70))
    assert fmt == "AVIF" and size == photo.size
    assert distance(hash_of(saved(photo, "AVIF", quality=70)), original) <= CLOSE


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG", "TIFF"])  # PNG with save_all = APNG
def test_animated_and_multipage_give_the_first_frame(photos, fmt):
    first, second = photos[0], photos[1].resize(photos[0].size)
    frames = [first, second] if fmt != "GIF" else [f.quantize(256) for f in (first, second)]
    data = saved(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert Image.open(data).n_frames == 2
    data.seek(0)
    h = hash_of(data)
    near, far = hash_of(io.BytesIO(jpeg_bytes(first))), hash_of(io.BytesIO(jpeg_bytes(second)))
    assert distance(near, far) > 3 * CLOSE  # the test photos really differ
    assert distance(h, near) <= CLOSE


def test_16_bit_images(photo):
    original = hash_of(io.BytesIO(jpeg_bytes(photo)))
    rgb16 = np.asarray(photo, np.uint16)[..., ::-1] * 257
    for ext, arr in ((".png", rgb16), (".tiff", rgb16), (".png", rgb16[..., 1])):  # RGB and grey
        ok, enc = cv2.imencode(ext, arr)
        assert ok
        data = io.BytesIO(enc.tobytes())
        img, size, _ = load_image(data)
        assert size == photo.size and img.mode == "RGB"
        data.seek(0)
        assert distance(hash_of(data), original) <= CLOSE
    grey = np.asarray(photo.convert("L"), float)
    ok, enc = cv2.imencode(".png", rgb16[..., 1])
    img, _, _ = load_image(io.BytesIO(enc.tobytes()))
    # the 16-bit range maps onto 0..255 (/257), not stretched: the green channel comes back
    assert np.abs(np.asarray(img.convert("L"), float) - np.asarray(photo, float)[..., 1]).max() <= 1
    assert grey.mean() > 0


def test_16_bit_grey_above_the_reduce_threshold(photo, tmp_path):
    """A 16-bit grey image above decode.REDUCE_ABOVE_PIXELS is box-reduced (Pillow's reduce refuses
    I;16: it was an error row, "image has wrong mode", and its 8-bit copy was missed), by bands of
    rows that give the whole reduce's values."""
    grey = np.asarray(photo.convert("L").resize((6000, 4200), Image.Resampling.BICUBIC), np.uint16) * 257
    ok, enc = cv2.imencode(".png", grey)
    assert ok and grey.size > decode.REDUCE_ABOVE_PIXELS
    img, size, _ = load_image(io.BytesIO(enc.tobytes()), min_side=256)
    assert size == (6000, 4200) and img.mode == "RGB"
    eight_bit = hash_of(io.BytesIO(jpeg_bytes(Image.fromarray((grey // 257).astype(np.uint8)))))
    assert distance(hash_of(io.BytesIO(enc.tobytes())), eight_bit) <= CLOSE
    sixteen = Image.fromarray(np.random.default_rng(0).integers(0, 65535, (1003, 1501), dtype=np.uint16))
    assert sixteen.mode == "I;16"
    banded = decode._reduce(sixteen, 7)
    assert np.array_equal(np.asarray(banded), np.asarray(sixteen.convert("I").reduce(7)))


def test_tiff_turned_by_its_orientation_has_the_turned_size(photo, tmp_path):
    """Pillow turns a TIFF by its orientation tag as it opens it: its size was turned once more
    (images.parquet said 321 x 481 for a 481 x 321 picture; a PNG with the same tag was right)."""
    exif = Image.Exif()
    exif[0x0112] = 6  # turned 90 degrees: shown as stored height x width
    for fmt in ("TIFF", "PNG", "JPEG"):
        img, size, _ = load_image(saved(photo, fmt, exif=exif))
        assert size == (photo.height, photo.width) == img.size, fmt


def test_a_named_pipe_is_refused_without_waiting_for_a_writer(photo, tmp_path):
    """A file of a run that is a named pipe by the time `dedupe report` draws it: opening it waited
    for a writer forever."""
    import os
    fifo = tmp_path / "now-a-pipe.jpg"
    os.mkfifo(fifo)
    with pytest.raises(DecodeError, match="not a regular file"):
        load_image(str(fifo))
    photo.save(tmp_path / "p.png")
    with open(tmp_path / "p.png", "rb") as fh:  # (an open file is still taken as Pillow takes it)
        assert load_image(fh)[1] == photo.size


def test_float_tiffs(photo):
    original = hash_of(io.BytesIO(jpeg_bytes(photo)))
    unit = np.asarray(photo, np.float32) / 255
    single = saved(Image.fromarray(unit.mean(axis=2), mode="F"), "TIFF")  # Pillow reads mode F
    assert Image.open(single).mode == "F"
    single.seek(0)
    ok, enc = cv2.imencode(".tiff", np.ascontiguousarray(unit[..., ::-1]))  # float RGB: OpenCV decodes it
    assert ok
    rgb = io.BytesIO(enc.tobytes())
    img, size, fmt = load_image(rgb)
    assert fmt == "TIFF" and size == photo.size
    assert np.abs(np.asarray(img, float) - np.asarray(photo, float)).max() <= 1
    for data in (single, rgb):
        data.seek(0)
        assert distance(hash_of(data), original) <= CLOSE


def test_cmyk_jpeg(photo):
    original = hash_of(io.BytesIO(jpeg_bytes(photo)))
    data = io.BytesIO(jpeg_bytes(photo.convert("CMYK")))
    assert Image.open(data).mode == "CMYK"
    data.seek(0)
    img, _, _ = load_image(data)
    assert img.mode == "RGB" and np.abs(np.asarray(img, float) - np.asarray(photo, float)).mean() < 5
    data.seek(0)
    assert distance(hash_of(data), original) <= CLOSE


def test_icc_tagged_jpeg_comes_back_as_srgb(photo_paths):
    # the most colourful of 20 real photos: Adobe RGB and sRGB numbers differ most on saturated
    # colours (neutral greys are the same in both)
    photos = [Image.open(p).convert("RGB") for p in photo_paths[:20]]
    chroma = [np.ptp(np.asarray(p, float), axis=2) for p in photos]
    pick = int(np.argmax([c.mean() for c in chroma]))
    photo, saturated = photos[pick], chroma[pick] >= np.percentile(chroma[pick], 90)
    icc = adobe_rgb_profile()
    wide = to_profile(photo, icc)
    data = io.BytesIO(jpeg_bytes(wide, icc_profile=icc))
    img, _, _ = load_image(data)
    plain, _, _ = load_image(io.BytesIO(jpeg_bytes(photo)))  # the same JPEG noise, no profile

    def error(x):  # mean level difference on the saturated tenth
        return np.abs(np.asarray(x, float) - np.asarray(photo, float))[saturated].mean()

    # the conversion matters (stored numbers ~8 levels off sRGB on saturated colours, measured)
    # and undoes it: within one level of a plain sRGB JPEG's own noise (~2.5 measured)
    assert error(wide) > 6
    assert error(img) < error(plain) + 1.0
    everywhere = [np.abs(np.asarray(x, float) - np.asarray(photo, float)).mean() for x in (img, plain)]
    assert everywhere[0] < everywhere[1] + 0.5
    # every tier decodes through to_rgb: the verify and confirm paths see the same sRGB pixels
    data.seek(0)
    again, _, _ = load_image(data, min_side=64)
    assert again.mode == "RGB" and again.width < img.width / 2  # DCT-scaled, still converted:
    mean = [np.asarray(x, float).reshape(-1, 3).mean(axis=0) for x in (again, img, wide)]
    assert np.abs(mean[0] - mean[1]).max() < 1.5 < np.abs(mean[2] - mean[1]).max()


def test_broken_profile_and_truncated_heic_are_clear(photo):
    # a garbage ICC blob is ignored (pixels as stored), never a failure
    img = photo.copy()
    img.info["icc_profile"] = b"not a profile" * 20
    assert np.array_equal(np.asarray(decode.to_rgb(img)), np.asarray(photo))
    heic = saved(photo, "HEIF", quality=80).getvalue()
    with pytest.raises(DecodeError, match="cannot|truncated"):
        load_image(io.BytesIO(heic[: len(heic) // 2]))


def test_one_photo_in_eight_formats_is_one_cluster(photo_paths, models_dir, tmp_path):
    from pipeline.run import run
    photo = Image.open(photo_paths[2]).convert("RGB")
    data = tmp_path / "data"
    data.mkdir()
    photo.save(data / "p.jpg", quality=90)
    photo.save(data / "p.png")
    photo.save(data / "p.tif")
    photo.save(data / "p.webp", quality=80)
    photo.save(data / "p8.heic", "HEIF", quality=80)
    (data / "p10.heic").write_bytes(heic_10bit(photo))
    photo.save(data / "p.heif", "HEIF", quality=60, chroma=444)
    if features.check("avif"):
        photo.save(data / "p.avif", quality=60)
    other = Image.open(photo_paths[3]).convert("RGB")  # a different photo stays out of the cluster
    other.save(data / "other.heic", "HEIF", quality=80)
    weights = models_dir / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.5_224_no_top.h5"
    cfg = load_config(None, [f"embed.weights={weights}"])
    run(data, tmp_path / "out", cfg, scheduler="sync", quiet=True)
    images = pd.read_parquet(tmp_path / "out" / "images.parquet").set_index("path")
    assert images["error"].isna().all(), images["error"].dropna().to_dict()
    same = images.drop(index="other.heic")
    assert len(same) == (8 if features.check("avif") else 7)
    assert same["cluster_id"].notna().all() and same["cluster_id"].nunique() == 1
    assert pd.isna(images.loc["other.heic", "cluster_id"])
    assert set(images["format"]) >= {"JPEG", "PNG", "TIFF", "WEBP", "HEIF"}


def test_heic_decodes_in_a_dask_worker_process(photo, tmp_path):
    # the opener is registered when pipeline.decode is imported, so a fresh worker process that
    # unpickles a decode task can read HEIC without any set-up of its own
    distributed = pytest.importorskip("distributed")
    path = tmp_path / "p.heic"
    photo.save(path, "HEIF", quality=80)
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0") \
            as cluster, distributed.Client(cluster) as client:
        size, fmt = client.submit(lambda p: load_image(p)[1:], str(path)).result()
    assert size == photo.size and fmt == "HEIF"


def test_a_png_damaged_mid_stream_is_an_error_not_half_a_picture(photo):
    """200 bytes flipped in the middle of a PNG's pixel data: an error (plain Pillow raises too).
    It decoded with no error, its lower part black (getexif decodes a PNG to find its EXIF, and
    the orientation lookup swallowed the failure): paired with its intact copy, a plan could keep
    the damaged one. An intact PNG's EXIF orientation still turns it."""
    exif = Image.Exif()
    exif[0x0112] = 6
    for extra in ({}, {"exif": exif.tobytes()}):
        good = saved(photo, "PNG", **extra).getvalue()
        rotten = bytearray(good)
        for i in range(len(rotten) // 2, len(rotten) // 2 + 200):
            rotten[i] ^= 0xFF
        for min_side in (None, 64):
            with pytest.raises(DecodeError):
                load_image(io.BytesIO(bytes(rotten)), min_side=min_side)
        img, size, fmt = load_image(io.BytesIO(good))
        w, h = photo.size
        assert fmt == "PNG" and size == ((h, w) if extra else (w, h)) and img.size == size


def test_a_truncated_avif_or_heic_says_what_it_is(photo):
    """A truncated AVIF said "not a recognised image format", as a text file does; a truncated
    HEIC's reason ended in a line break."""
    for fmt in ("AVIF", "HEIF"):
        whole = saved(photo, fmt, quality=80).getvalue()
        with pytest.raises(DecodeError) as exc:
            load_image(io.BytesIO(whole[: len(whole) // 2]))
        text = str(exc.value)
        assert text == text.strip() and "\n" not in text and "not a recognised image format" not in text
    with pytest.raises(DecodeError, match="its first bytes say AVIF"):
        whole = saved(photo, "AVIF", quality=80).getvalue()
        load_image(io.BytesIO(whole[: len(whole) // 2]))
    with pytest.raises(DecodeError, match="^not a recognised image format$"):
        load_image(io.BytesIO(b"plain text, no image at all " * 4))


def test_a_raw_file_named_as_a_jpeg_is_a_raw_error():
    """On a store an object whose name says image is not sniffed at the listing: an ORF named
    .jpg reached the decoder, which said "corrupt or truncated"; it is a camera RAW file."""
    from pipeline.scan import RAW_ERROR
    with pytest.raises(DecodeError, match="^" + RAW_ERROR.replace("(", r"\(").replace(")", r"\)") + "$"):
        load_image(io.BytesIO(b"IIRO\x08\x00\x00\x00" + bytes(4000)))


def test_a_camera_jpeg_with_an_mpf_preview_decodes_at_a_reduced_scale(photo):
    """Nikon, Canon and Fuji JPEGs carry an MPF preview, and Pillow opens them as "MPO": they were
    decoded at full size by every tier (the screen 8x slower). Now at the draft scale, as JPEG."""
    big = photo.resize((photo.width * 4, photo.height * 4), Image.Resampling.BICUBIC)
    plain = saved(big, "JPEG", quality=92)
    mpo = saved(big, "MPO", quality=92, save_all=True, append_images=[photo])
    assert Image.open(mpo).format == "MPO"
    a, size_a, _ = load_image(plain, min_side=64)
    b, size_b, fmt = load_image(mpo, min_side=64)
    assert fmt == "MPO" and size_b == size_a == big.size
    assert b.size == a.size and max(b.size) <= max(big.size) // 4
    assert np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max() <= 2


def test_a_colour_key_transparency_is_composited_on_white_like_an_alpha(photo):
    """A PNG whose transparency is a colour key (tRNS; what optimisers make of an alpha that is
    only on or off) kept its key colour: a logo on black hashed as the inverse of the same logo
    saved with an alpha channel, and the two were never paired."""
    logo = Image.new("RGB", (240, 160), (0, 0, 0))
    logo.paste(photo.resize((120, 80)), (60, 40))
    alpha = Image.new("L", logo.size, 0)
    alpha.paste(255, (60, 40, 180, 120))
    rgba = logo.copy()
    rgba.putalpha(alpha)
    reference = np.asarray(load_image(saved(rgba, "PNG"))[0], np.int16)
    grey = logo.convert("L")
    for keyed in (saved(logo, "PNG", transparency=(0, 0, 0)), saved(grey, "PNG", transparency=0)):
        img = np.asarray(load_image(keyed)[0], np.int16)
        assert (img[:30] == 255).all()  # (the keyed border is white, as the alpha one)
        if keyed.getvalue()[25] == 2:  # (the RGB one: the same pixels as the alpha's)
            assert np.abs(img - reference).max() <= 1
    assert distance(hash_of(saved(logo, "PNG", transparency=(0, 0, 0))), hash_of(saved(rgba, "PNG"))) <= CLOSE



def _grey_png(bits: int, key: int) -> bytes:
    """An 8x8 grey PNG of `bits` per pixel: its left half `key` (the tRNS colour key), its right
    half white."""
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    values = [key] * 4 + [(1 << bits) - 1] * 4
    acc = n = 0
    row = bytearray()
    for v in values:
        acc, n = (acc << bits) | v, n + bits
        while n >= 8:
            n -= 8
            row.append((acc >> n) & 0xFF)
    if n:
        row.append((acc << (8 - n)) & 0xFF)
    body = zlib.compress((b"\x00" + bytes(row)) * 8)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 8, 8, bits, 0, 0, 0, 0))
            + chunk(b"tRNS", struct.pack(">H", key)) + chunk(b"IDAT", body) + chunk(b"IEND", b""))


def test_a_low_bit_grey_colour_key_is_transparent_too():
    """In a 2- or 4-bit grey PNG Pillow scales the pixels to 8 bits and keeps the tRNS key as
    stored (1 of 0-3 against pixels of 85), so the key matched nothing and stayed grey."""
    for bits, key in ((2, 1), (4, 7), (8, 100)):
        img = np.asarray(load_image(io.BytesIO(_grey_png(bits, key)))[0])
        assert (img == 255).all(), (bits, img[0, :, 0])

def test_a_png_with_megabytes_of_metadata_decodes(photo):
    """Photoshop's XMP history or a large colour profile: more than Pillow's 1 MB per text chunk
    made a valid PNG an error row."""
    from PIL import PngImagePlugin
    xmp = "<x:xmpmeta>" + "".join(f"<rdf:li>xmp.did:{i:032x}</rdf:li>" for i in range(60_000)) + "</x:xmpmeta>"
    for zipped in (False, True):
        info = PngImagePlugin.PngInfo()
        info.add_itxt("XML:com.adobe.xmp", xmp, zip=zipped)
        img, size, fmt = load_image(saved(photo, "PNG", pnginfo=info), min_side=64)
        assert fmt == "PNG" and size == photo.size
    # past the limit (32 MiB a chunk): said so, not Pillow's "MAX_TEXT_CHUNK" and "corrupt or truncated?"
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "x" * (33 * 2**20), zip=True)
    with pytest.raises(DecodeError, match=r"^PNG text too large: a text or profile chunk decompresses past the "
                                          r"limit of 32 MiB a chunk, 64 MiB a file$"):
        load_image(saved(photo.resize((64, 48)), "PNG", pnginfo=info), min_side=64)


def _icon_holding(png: bytes, side: int = 0) -> bytes:
    """An ICO whose directory says side x side (one byte: 0 is 256) and whose picture is `png`."""
    return struct.pack("<HHH", 0, 1, 1) + struct.pack("<BBBBHHII", side, side, 0, 0, 1, 32, len(png), 22) + png


def _png_of_zeros(w: int, h: int) -> bytes:
    """A w x h RGBA PNG of zeros, compressed row by row (a few MB however large)."""
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    z = zlib.compressobj(9)
    row = b"\0" * (1 + 4 * w)
    body = b"".join(z.compress(row) for _ in range(h)) + z.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 6, 0, 0, 0))
            + chunk(b"IDAT", body) + chunk(b"IEND", b""))


def test_an_icon_holding_a_huge_picture_is_refused_before_pillow_decodes_it(photo, monkeypatch):
    """Pillow decodes an icon's picture as it opens the file, and the directory's sizes are one
    byte each (256 at most): a 3.5 MB ICO holding a 30000x30000 PNG took 3.6 GB before its size
    was checked. Its pictures' own headers are read first now; Pillow must never be asked."""
    huge = io.BytesIO(_icon_holding(_png_of_zeros(12_000, 12_000)))
    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda *a, **k: opened.append(a) or real_open(*a, **k))
    with pytest.raises(DecodeError, match="icon holds a 12000x12000 picture.*max_decode_bytes"):
        load_image(huge, min_side=64)
    with pytest.raises(DecodeError, match="icon holds a 12000x12000 picture.*max_pixels"):
        load_image(huge, min_side=64, max_pixels=100_000_000)
    assert not opened
    small = io.BytesIO(_icon_holding(saved(photo.resize((64, 64)), "PNG").getvalue(), 64))
    img, size, fmt = load_image(small)  # (an ordinary icon still opens)
    assert fmt == "ICO" and size == (64, 64)


def test_a_huge_progressive_jpeg_is_refused_by_what_its_coefficients_take(photo):
    """A progressive JPEG keeps every DCT coefficient at full size while it decodes, whatever the
    draft scale: 14000x14000 took 1.26 GB where the draft size said 12 MB. Its baseline twin,
    decoded at 1/8 within the budget, is still read."""
    big = photo.resize((4000, 3000))
    for progressive in (False, True):
        data = saved(big, "JPEG", quality=80, progressive=progressive, subsampling=0)
        budget = 40 * 2**20  # (4:4:4 progressive: 6 B a pixel, 69 MiB)
        if progressive:
            with pytest.raises(DecodeError, match="progressive JPEG of 4000x3000.*69 MiB"):
                load_image(data, min_side=64, max_decode_bytes=budget)
        else:
            assert load_image(data, min_side=64, max_decode_bytes=budget)[1] == (4000, 3000)
    assert load_image(saved(big, "JPEG", progressive=True), min_side=64)[1] == (4000, 3000)


def _rotten(data: bytes, at: float = 0.45, hits: int = 32) -> bytes:
    """`data` with `hits` bytes changed ~97 bytes apart from `at` of its length (bit rot in a
    backup: the same size, the header intact)."""
    rot = bytearray(data)
    start = int(len(rot) * at)
    for i in range(start, start + hits * 97, 97):
        rot[i] ^= 0x5A
    return bytes(rot)


def test_a_jpeg_damaged_mid_stream_is_an_error_row_and_an_intact_one_decodes_as_before(photo, tmp_path):
    """Pillow drops libjpeg's "Corrupt JPEG data" warnings: a backup copy with a few bytes
    changed decoded with no error, a band of garbage at its bottom, was paired with the intact
    original, and a plan kept it. The screen's JPEG decode now raises on them (grey, RGB and a
    camera file's MPO alike); `screen.strict_jpeg: false` reads such a file as before. An intact
    file's pixels are Pillow's (both are libjpeg-turbo)."""
    from pipeline.scan import FileEntry
    from pipeline.screen import screen_file
    big = photo.resize((photo.width * 2, photo.height * 2), Image.Resampling.BICUBIC)
    # (CMYK: decoded by Pillow, its compressed data checked all the same; a damaged CMYK copy went
    # through as whole)
    for kind, data in (("JPEG", jpeg_bytes(big)), ("JPEG", jpeg_bytes(big.convert("L"))),
                       ("JPEG", jpeg_bytes(big.convert("CMYK"))),
                       ("MPO", saved(big, "MPO", quality=92, save_all=True, append_images=[photo]).getvalue())):
        for min_side in (None, 64):
            strict, size, fmt = load_image(io.BytesIO(data), min_side=min_side, strict_jpeg=True)
            plain = load_image(io.BytesIO(data), min_side=min_side)[0]
            assert fmt == kind and size == big.size and strict.size == plain.size and strict.mode == "RGB"
            assert np.abs(np.asarray(strict, np.int16) - np.asarray(plain, np.int16)).max() <= 1
            # JPEG has no checksum: libjpeg notices most damage, not all (92 % of 72 copies of
            # the shared photos; here 9 spots of this file)
            silent_before = refused = 0
            for at in np.arange(0.1, 0.91, 0.1):
                rotten = _rotten(data, at)
                try:
                    load_image(io.BytesIO(rotten), min_side=min_side)
                    silent = True
                except DecodeError:
                    silent = False
                try:
                    load_image(io.BytesIO(rotten), min_side=min_side, strict_jpeg=True)
                except DecodeError as exc:
                    assert str(exc).startswith(("damaged JPEG data: ", "cannot decode: ")), str(exc)
                    refused += 1
                    silent_before += silent
            assert refused >= 6 and silent_before >= 3, (kind, min_side, refused, silent_before)
    with pytest.raises(DecodeError, match="truncated file"):
        load_image(io.BytesIO(data[: len(data) * 2 // 3]), min_side=64, strict_jpeg=True)

    def screened(blob: bytes, cfg: ScreenConfig) -> dict:
        path = tmp_path / "copy.jpg"
        path.write_bytes(blob)
        return screen_file(FileEntry(path=path.name, abs_path=str(path), bytes=len(blob), mtime=0.0), cfg)

    rotten = next(r for r in (_rotten(jpeg_bytes(big), at) for at in np.arange(0.1, 0.91, 0.1))
                  if screened(r, ScreenConfig(strict_jpeg=False))["error"] is None
                  and screened(r, ScreenConfig())["error"] is not None)
    row = screened(rotten, ScreenConfig())
    assert row["error"].startswith("damaged JPEG data: Corrupt JPEG data") and row["sha256"] and row["codes"] is None
    assert screened(jpeg_bytes(big), ScreenConfig())["error"] is None



def test_a_damaged_file_says_which_format_failed(photo):
    """A reader's own words alone ("could not create decoder object", "decoder error -2") did not
    say what was wrong: the error names the format its bytes claim and suggests damage."""
    webp = saved(photo, "WEBP", quality=80).getvalue()
    with pytest.raises(DecodeError, match=r"^cannot open: .*\(its first bytes say WEBP: corrupt or truncated\?\)"):
        load_image(io.BytesIO(webp[: len(webp) // 2]), min_side=64)
    tiff = bytearray(saved(photo, "TIFF", compression="tiff_lzw").getvalue())
    for i in range(len(tiff) // 3, len(tiff) // 3 + 4000, 7):
        tiff[i] ^= 0xA5
    with pytest.raises(DecodeError, match=r"^(cannot decode: .*\(TIFF data: corrupt or truncated\?\)|truncated file)"):
        load_image(io.BytesIO(bytes(tiff)), min_side=64)


# a 64x48 generated gradient, arithmetic-coded by libjpeg-turbo's `cjpeg -arithmetic`
ARITHMETIC_JPEG = (
    "/9j/4AAQSkZJRgABAQAAAQABAAD/2wBDAAYEBQYFBAYGBQYHBwYIChAKCgkJChQODwwQFxQYGBcUFhYaHSUfGhsjHBYWICwg"
    "IyYnKSopGR8tMC0oMCUoKSj/2wBDAQcHBwoIChMKChMoGhYaKCgoKCgoKCgoKCgoKCgoKCgoKCgoKCgoKCgoKCgoKCgoKCgo"
    "KCgoKCgoKCgoKCgoKCj/yQARCAAwAEADASIAAhEBAxEB/8wACgAQEAUBEBEF/9oADAMBAAIRAxEAPwD/ANuWb0VESRe2S4sH"
    "dHUrvC1U3gIu3AR71kPAlLFNGCaS0dG1X3xKovQdIWXPIVVGLDJaRfmUmHHiPyNEpxjE1xfwl/7G6JX6mmJNgtmGgbuKcwTb"
    "1AUIkbRJ5OkhAu4PSmNzr0f1Qjldg6Amrs/YL5ik7p8k6vHlZYfXMO8LjBwUemF5Bz5nwcsNAPR5aYQSttPyneTLRRMCozFN"
    "BuVUVnFU66gelK2K6y/U5v/Z")


def test_header_warnings_are_no_damage_and_an_arithmetic_jpeg_is_read_as_by_the_other_tiers(photo):
    """libjpeg warns about headers too (a padding byte before a table, an unknown JFIF version, a
    baseline scan header with Se=0): the picture is whole, and the strict screen made such files
    error rows. Only warnings about the compressed picture are damage now. An arithmetic-coded
    JPEG (SOF9) goes the other tiers' way (Pillow's), so that the screen never reads a file they
    cannot."""
    import base64
    base = jpeg_bytes(photo)
    k = base.find(b"\xff\xdb")
    j = base.find(b"JFIF\x00")
    s = base.find(b"\xff\xda")
    end = s + 2 + int.from_bytes(base[s + 2:s + 4], "big")
    variants = {"pad before DQT": base[:k] + b"\x00" + base[k:],
                "JFIF 2.01": base[:j + 5] + b"\x02\x01" + base[j + 7:],
                "SOS Se=0": base[:end - 2] + b"\x00" + base[end - 1:]}
    plain = np.asarray(load_image(io.BytesIO(base), min_side=64)[0], np.int16)
    for name, data in variants.items():
        img = load_image(io.BytesIO(data), min_side=64, strict_jpeg=True)[0]
        assert np.abs(np.asarray(img, np.int16) - plain).max() <= 1, name  # (another libjpeg build: +-1)
    arithmetic = base64.b64decode(ARITHMETIC_JPEG)
    assert decode._arithmetic_coded(arithmetic) and not decode._arithmetic_coded(base)
    seen = [np.asarray(load_image(io.BytesIO(arithmetic), strict_jpeg=strict)[0]) for strict in (True, False)]
    assert seen[0].shape == (48, 64, 3) and np.array_equal(seen[0], seen[1])


def test_an_icon_with_the_old_bitmap_header_is_read_by_its_own_sizes():
    """A DIB icon with the 12-byte core header (16-bit width and height) was read as the 40-byte
    one, and a 32x32 icon refused as 4194336x786432 pixels."""
    w = h = 32
    core = struct.pack("<IHHHH", 12, w, 2 * h, 1, 24)
    pixels = b"\x80" * (w * 3 * h) + b"\x00" * (4 * h)  # (24-bit rows, then the 1-bit mask)
    icon = _icon_holding(core + pixels, w)
    assert decode._icon_pictures(io.BytesIO(icon)) == [(32, 32)]
