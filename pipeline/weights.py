"""Finding, checking and seeding the ImageNet MobileNet weights of the confirm tier.

`embed.weights: imagenet` means the standard Keras cache, `$KERAS_HOME/models/<keras file name>`
(`KERAS_HOME` defaults to `~/.keras`), exactly where `keras.applications.MobileNetV2(weights=
"imagenet")` would download and look; any other value is a path to a `.h5` weights file. Either way
the file's sha256 is checked against `PINNED_SHA256` (a mismatch is an error; a file name we could
not pin is accepted with a logged warning). Keras itself is only ever handed a checked file path,
never `"imagenet"` (it would download inside a worker, possibly hanging) and never `None` (random
weights give cosine ~0.98 for everything, i.e. every pair a "duplicate").

The orchestrator calls `check_weights_available(cfg)` before any heavy work: when the file is
missing and cannot be downloaded it raises `WeightsError` (a `ConfigError`, so the CLI exits 2)
saying which file to put where. Downloads happen only when `embed.download` is true, the
environment variable `DEDUPE_OFFLINE` is not set, and an HTTPS request to the Keras download host
gets an answer within `NETWORK_PROBE_TIMEOUT` seconds (DNS and TLS included; a bare TCP connect is
not enough, sandboxes accept those), so an offline machine fails in seconds instead of hanging.

`seed_cache(from_dir)` / `weights_command(from_dir)` (`make weights`, `python -m pipeline weights
--from DIR`) copy the known weight files of a folder into the Keras cache after checking them.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys
import tempfile
import threading
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from pipeline.config import ConfigError, EmbedConfig

log = logging.getLogger(__name__)

OFFLINE_ENV = "DEDUPE_OFFLINE"  # set to 1/true/yes: never try to download weights
DOWNLOAD_HOST = "storage.googleapis.com"  # where Keras downloads its application weights
DOWNLOAD_PROBE_URL = f"https://{DOWNLOAD_HOST}/tensorflow/keras-applications/"
NETWORK_PROBE_TIMEOUT = 2.5  # seconds for DNS + connect + TLS + an HTTP answer from the probe URL
DOWNLOAD_TIMEOUT = 60.0  # seconds without progress before a download is abandoned

BASE_URLS = {
    "MobileNetV2": "https://storage.googleapis.com/tensorflow/keras-applications/mobilenet_v2/",
    "MobileNet": "https://storage.googleapis.com/tensorflow/keras-applications/mobilenet/",
}
# The alphas and sizes Keras publishes ImageNet weights for (other sizes load the 224 file).
V2_ALPHAS = (0.35, 0.5, 0.75, 1.0, 1.3, 1.4)
V2_SIZES = (96, 128, 160, 192, 224)
V1_ALPHAS = (0.25, 0.5, 0.75, 1.0)
V1_SIZES = (128, 160, 192, 224)
_V1_ALPHA_TEXT = {1.0: "1_0", 0.75: "7_5", 0.5: "5_0", 0.25: "2_5"}

# sha256 of the no-top Keras weight files, pinned from files verified on this project's machines
# (../shared/models/SHA256SUMS). Keras publishes no hashes for the MobileNet files and there is no
# network here, so the other 26 (alpha, size) files are known by name but NOT pinned (None): they
# are accepted with a logged warning. Pin a file by adding its sha256 here once verified from an
# independent download.
PINNED_SHA256: dict[str, str | None] = {}
for _a in V2_ALPHAS:
    for _s in V2_SIZES:
        PINNED_SHA256[f"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_{float(_a)}_{_s}_no_top.h5"] = None
for _a in V1_ALPHAS:
    for _s in V1_SIZES:
        PINNED_SHA256[f"mobilenet_{_V1_ALPHA_TEXT[_a]}_{_s}_tf_no_top.h5"] = None
PINNED_SHA256.update({
    "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.5_224_no_top.h5":
        "279052de2cfa801003aa6cc25cc4d007d35dd0b76f06935268c79788b7642d05",
    "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_224_no_top.h5":
        "df1c3db1d0d9193719c4c70f707c56f7021f999f825bdc57454c275cf6def19f",
    "mobilenet_2_5_224_tf_no_top.h5":
        "dbdb03ee2a22fd895301636cd328b234bb3a9952358f436d82f46b81e0d5b0bf",
})
_NAME_BY_SHA = {sha: name for name, sha in PINNED_SHA256.items() if sha}


class WeightsError(ConfigError):
    """The weights file is missing, cannot be fetched, or is not the expected file."""


def _embed_cfg(cfg) -> EmbedConfig:
    """Accept the whole Config or its `embed` section."""
    return getattr(cfg, "embed", cfg)


def weights_file_name(cfg: EmbedConfig) -> str:
    """The Keras file name `weights="imagenet"` resolves to for this backbone/alpha/input size."""
    cfg = _embed_cfg(cfg)
    alpha, size = float(cfg.alpha), int(cfg.input_size)
    if cfg.backbone == "MobileNetV2":
        if alpha not in V2_ALPHAS:
            raise WeightsError(f"embed.alpha={cfg.alpha}: ImageNet weights for MobileNetV2 exist only "
                               f"for alpha in {list(V2_ALPHAS)}")
        rows = size if size in V2_SIZES else 224  # as Keras does (with a warning)
        return f"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_{alpha}_{rows}_no_top.h5"
    if cfg.backbone == "MobileNet":
        if alpha not in V1_ALPHAS:
            raise WeightsError(f"embed.alpha={cfg.alpha}: ImageNet weights for MobileNet (v1) exist only "
                               f"for alpha in {list(V1_ALPHAS)}")
        rows = size if size in V1_SIZES else 224
        return f"mobilenet_{_V1_ALPHA_TEXT[alpha]}_{rows}_tf_no_top.h5"
    raise WeightsError(f"embed.backbone={cfg.backbone!r}: expected MobileNetV2 or MobileNet")


def weights_url(cfg: EmbedConfig) -> str:
    cfg = _embed_cfg(cfg)
    return BASE_URLS[cfg.backbone] + weights_file_name(cfg)


def keras_home() -> Path:
    """`$KERAS_HOME`, else `~/.keras` (read at call time, so tests can monkeypatch it)."""
    home = os.environ.get("KERAS_HOME")
    if home:
        return Path(home).expanduser()
    base = Path("~").expanduser()
    return (base if os.access(base, os.W_OK) else Path("/tmp")) / ".keras"


def cache_dirs(home: Path | None = None) -> list[Path]:
    """Where Keras keeps downloaded weights: `<home>/models`, plus `/tmp/.keras/models`, which
    Keras's `get_file` uses when `<home>` is not writable."""
    home = Path(home) if home else keras_home()
    dirs = [home / "models"]
    fallback = Path(tempfile.gettempdir()) / ".keras" / "models"
    if not os.access(home, os.W_OK) and fallback not in dirs:
        dirs.append(fallback)
    return dirs


_SHA_CACHE: dict[tuple[str, int, int], str] = {}
_SHA_LOCK = threading.Lock()


def sha256_file(path: str | Path) -> str:
    """sha256 hex of a file, cached per process by (path, size, mtime)."""
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    with _SHA_LOCK:
        if key in _SHA_CACHE:
            return _SHA_CACHE[key]
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    value = digest.hexdigest()
    with _SHA_LOCK:
        _SHA_CACHE[key] = value
    return value


def verify_file(path: str | Path, expected_name: str | None = None) -> str:
    """Check a weights file against the pinned table; returns its sha256.

    The file is identified by its name when it is a known Keras name, else by its sha256. Errors:
    a known name whose content has another pinned hash (corrupt or truncated download), or a file
    that is identified as the weights of another alpha/size/backbone than `expected_name`.
    A file that cannot be identified (unpinned name, unknown hash) is accepted with a warning.
    """
    path = Path(path)
    sha = sha256_file(path)
    name = path.name if path.name in PINNED_SHA256 else _NAME_BY_SHA.get(sha)
    if name is None:
        log.warning("weights file %s (sha256 %s) is not a known Keras MobileNet file; using it "
                    "unchecked", path, sha)
        return sha
    if expected_name and name != expected_name:
        raise WeightsError(f"weights file {path} is {name}, but the embed config (backbone, alpha, "
                           f"input_size) needs {expected_name}: fix embed.weights or embed.alpha")
    pinned = PINNED_SHA256.get(name)
    if pinned is None:
        log.warning("weights file %s: no pinned sha256 for %s (cannot be verified here), "
                    "sha256 is %s; using it unchecked", path, name, sha)
    elif sha != pinned:
        raise WeightsError(f"weights file {path} has sha256 {sha}, expected {pinned} for {name}: the "
                           f"file is corrupt or truncated; delete it and copy a good one (`{seed_command()}`)")
    return sha


def offline() -> bool:
    return os.environ.get(OFFLINE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def network_available(url: str = DOWNLOAD_PROBE_URL, timeout: float = NETWORK_PROBE_TIMEOUT) -> bool:
    """True when an HTTPS HEAD request to `url` gets any HTTP answer within `timeout` seconds.

    A bare TCP connect is not enough: sandboxes and proxies accept connections to any address and
    then fail at TLS, and DNS lookups have no timeout of their own, so the request runs in a daemon
    thread that is abandoned when late."""
    result: list[bool] = []

    def probe():
        try:
            req = urllib.request.Request(url, method="HEAD")
            with urllib.request.urlopen(req, timeout=timeout):
                result.append(True)
        except urllib.error.HTTPError:  # the server answered (403/404...): the network works
            result.append(True)
        except (OSError, ValueError):
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True, name="weights-network-probe")
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def seed_command(folder: str = "FOLDER") -> str:
    """The command that seeds the cache, in the words of the tool the user ran (the CLI and the
    Makefile set DEDUPE_PROG): `make weights`, `python -m pipeline weights` or `dedupe weights`."""
    prog = os.environ.get("DEDUPE_PROG", "dedupe")
    if prog == "make":
        return f"make weights WEIGHTS_DIR={folder}"
    return f"{prog} weights --from {folder}"


def _instructions(name: str, dirs: list[Path]) -> str:
    return (f"put {name} into {dirs[0]}/ (`{seed_command()}` copies and checks it from a FOLDER that "
            f"holds it), or point the run at the file with --set embed.weights=/path/to/{name}")


def _download(url: str, dest: Path, expected_name: str) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.part")
    log.info("downloading %s -> %s", url, dest)
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT) as resp, open(tmp, "wb") as fh:
            shutil.copyfileobj(resp, fh, 1 << 20)
        sha = sha256_file(tmp)
        pinned = PINNED_SHA256.get(expected_name)
        if pinned and sha != pinned:
            raise WeightsError(f"downloaded {url} has sha256 {sha}, expected {pinned}")
        os.replace(tmp, dest)
    except WeightsError:
        raise
    except (OSError, ValueError) as exc:
        raise WeightsError(f"cannot download {url}: {exc}; {_instructions(expected_name, [dest.parent])}") from None
    finally:
        if tmp.exists():
            tmp.unlink()
    return dest


def resolve_weights(cfg: EmbedConfig, allow_download: bool) -> Path:
    """The checked weights file for `cfg` (EmbedConfig or the whole Config).

    `weights: imagenet` -> `$KERAS_HOME/models/<keras name>`, downloaded there (once, like Keras
    does) when missing and `allow_download`; a path -> that file. Raises `WeightsError`.
    """
    cfg = _embed_cfg(cfg)
    expected = weights_file_name(cfg)
    if cfg.weights and cfg.weights != "imagenet":
        path = Path(cfg.weights).expanduser()
        if path.is_dir():
            path = path / expected
        if not path.is_file():
            raise WeightsError(f"embed.weights={cfg.weights!r}: no such file; point it at {expected} "
                               f"(or set embed.weights: imagenet to use the Keras cache)")
        if path.suffix.lower() not in (".h5", ".hdf5"):
            raise WeightsError(f"embed.weights={cfg.weights!r}: Keras loads these weights only from a "
                               f".h5 file")
        verify_file(path, expected)
        return path.resolve()
    dirs = cache_dirs()
    for d in dirs:
        candidate = d / expected
        if candidate.is_file():
            verify_file(candidate, expected)
            return candidate
    if not allow_download:
        raise WeightsError(f"ImageNet weights {expected} not found in {', '.join(map(str, dirs))} and "
                           f"downloading is off: {_instructions(expected, dirs)}")
    if offline():
        raise WeightsError(f"ImageNet weights {expected} not found in {', '.join(map(str, dirs))} and "
                           f"{OFFLINE_ENV} is set (no download): {_instructions(expected, dirs)}")
    if not network_available():
        raise WeightsError(f"ImageNet weights {expected} not found in {', '.join(map(str, dirs))} and "
                           f"{DOWNLOAD_HOST} is unreachable (no network): {_instructions(expected, dirs)}")
    target_dir = dirs[0] if _writable_dir(dirs[0]) else dirs[-1]
    return _download(weights_url(cfg), target_dir / expected, expected)


def _writable_dir(d: Path) -> bool:
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(d, os.W_OK)


def check_weights_available(cfg) -> dict:
    """Called by the orchestrator before any heavy work when the confirm tier will run: resolves
    (downloading once if allowed and online) and checks the weights; raises `WeightsError`.
    Returns what run.json records: {"path", "file", "sha256", "pinned"}."""
    embed = _embed_cfg(cfg)
    path = resolve_weights(embed, allow_download=bool(getattr(embed, "download", True)))
    sha = sha256_file(path)
    return {"path": str(path), "file": weights_file_name(embed), "sha256": sha,
            "pinned": PINNED_SHA256.get(weights_file_name(embed)) == sha}


def _read_sums(from_dir: Path) -> dict[str, str]:
    sums: dict[str, str] = {}
    f = from_dir / "SHA256SUMS"
    if f.is_file():
        for line in f.read_text(encoding="utf-8", errors="replace").splitlines():
            parts = line.split()
            if len(parts) == 2 and len(parts[0]) == 64:
                sums[parts[1].lstrip("*")] = parts[0].lower()
    return sums


def seed_cache(from_dir: str | Path, keras_home: str | Path | None = None) -> list[Path]:
    """Copy the known Keras MobileNet weight files found in `from_dir` into `<keras_home>/models`
    (default `$KERAS_HOME` or `~/.keras`) after checking their sha256 against the pinned table (and
    against `from_dir/SHA256SUMS` when present). Files already in place with the right content are
    left alone. Returns the cache paths; raises `WeightsError`."""
    src = Path(from_dir).expanduser()
    if not src.is_dir():
        raise WeightsError(f"weights folder {src} does not exist: pass the folder holding the .h5 files "
                           f"({seed_command('FOLDER')})")
    target = Path(keras_home).expanduser() / "models" if keras_home else cache_dirs()[0]
    sums = _read_sums(src)
    found = sorted(p for p in src.iterdir() if p.is_file() and p.name in PINNED_SHA256)
    if not found:
        raise WeightsError(f"no known Keras MobileNet weight files in {src} (expected names like "
                           f"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.5_224_no_top.h5)")
    target.mkdir(parents=True, exist_ok=True)
    out = []
    for path in found:
        sha = verify_file(path)
        if path.name in sums and sums[path.name] != sha:
            raise WeightsError(f"{path}: sha256 {sha} does not match {src / 'SHA256SUMS'} ({sums[path.name]})")
        dest = target / path.name
        if dest.is_file() and sha256_file(dest) == sha:
            out.append(dest)
            continue
        tmp = target / f".{path.name}.{uuid.uuid4().hex}.tmp"
        try:
            shutil.copyfile(path, tmp)
            os.replace(tmp, dest)
        finally:
            if tmp.exists():
                tmp.unlink()
        out.append(dest)
    return out


def weights_command(from_dir: str | Path, keras_home: str | Path | None = None) -> int:
    """`python -m pipeline weights --from DIR`: seed the Keras cache; 0 on success, 2 on error."""
    try:
        paths = seed_cache(from_dir, keras_home)
    except WeightsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for p in paths:
        pinned = "verified" if PINNED_SHA256.get(p.name) else "NOT pinned (unverified)"
        print(f"{p}  sha256 {sha256_file(p)[:16]}...  {pinned}")
    print(f"{len(paths)} weight file(s) in {paths[0].parent}")
    return 0
