"""Images, outputs and the catalog on object storage (S3, GCS, Azure, ...): any fsspec URL for
DATA, OUT, work_dir and the catalog (the catalog's own layout and commit: pipeline/catalog.py).

Local paths (and `file://` URLs, turned into paths by `local_form`) never come here: they keep the
local code (pipeline/paths.py, pipeline/outdir.py). For a URL:

* **Options.** `storage.options` of the config are the keyword arguments of the fsspec filesystem
  (e.g. `endpoint_url`, `anon`, `profile`); credentials come from the backend's usual sources
  (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_PROFILE / AWS_ENDPOINT_URL for S3,
  GOOGLE_APPLICATION_CREDENTIALS for GCS, AZURE_STORAGE_* for Azure). The driver calls `configure`;
  every Dask worker gets the same options through `OptionsPlugin` and makes its own filesystem,
  so image bytes go from the store to the worker that reads them, never through the scheduler.
* **Scan.** `iter_objects` lists the prefix one "folder" at a time (sorted, like the local walk)
  with each object's size, last-modified time and ETag; only objects without an image extension
  are sniffed (a 32-byte ranged read), the others are checked when the screen reads them.
* **Publish.** A single PUT is atomic on an object store and there is no rename. `publish` uploads
  the run's files under `OUT/.dedupe/gen-<run id>/`, then writes the pointer object
  `OUT/.dedupe/current` (the commit point: it names the generation), then copies the files to
  their stable names in OUT with `run.json` last, skipping those OUT already holds with the same
  bytes (by the listings' content tags). The report's thumbnails and drawings of unchanged images
  are copied on the server from the last generation (`last_generation`, `server_copy`, which
  waits for Azure's copies), never downloaded and uploaded again. Each object a reader opens is whole; a reader that must never mix two runs reads
  `.dedupe/current` and then the generation it names (or checks the sha256 list in `run.json`).
  The previous generation is kept, older ones are removed.
* **Lock.** `locked` creates `OUT/.dedupe.lock` with an exclusive create (S3 `If-None-Match: *`);
  a second run finds it and stops naming the holder. The holder rewrites the object every
  LOCK_REFRESH_S (a lease): a run killed outright (kill -9, a lost host) stops renewing it, and the
  next run takes over a lock whose last-modified time is older than LOCK_LEASE_S, with a warning
  naming the old holder. A catalog on a store is locked the same way (`CATALOG/.catalog.lock`).
"""
from __future__ import annotations

import contextlib
import errno
import io
import itertools
import json
import logging
import os
import re
import shutil
import socket
import sys
import tempfile
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

from pipeline import scan
from pipeline.config import ConfigError, ScanConfig

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger("pipeline")
LOCK_NAME = ".dedupe.lock"
# A store has no process to ask whether a lock's holder is alive: the holder renews the lock object
# every LOCK_REFRESH_S, and a lock not renewed for LOCK_LEASE_S (clock skew between hosts and the
# store included) is a dead run's and is taken over.
LOCK_REFRESH_S = 60.0
LOCK_LEASE_S = 600.0
STATE_DIR = ".dedupe"
WORK_PREFIX = "_work-"
# keys of storage.options never written to run.json or the Parquet metadata ("connection":
# adlfs's connection_string / conn_str, which carries the account key)
SECRET_WORDS = ("secret", "token", "password", "key", "credential", "sas", "signature", "connection", "conn_str")
# values that are secrets whatever their key is called (an Azure connection string or SAS URL)
SECRET_VALUES = ("accountkey=", "sharedaccesssignature=", "sig=")

_options: dict = {}


def local_form(path: str | os.PathLike) -> str | os.PathLike:
    """`file:///x` (and `file://localhost/x`) -> `/x`, percent-escapes decoded as in any URL
    (`Path.as_uri()` writes a space as %20); anything else unchanged."""
    if isinstance(path, str) and path.lower().startswith("file:"):
        from urllib.parse import unquote_to_bytes, urlsplit
        parts = urlsplit(path)
        if parts.netloc not in ("", "localhost"):  # (file://nas/share: another machine's disk)
            raise ConfigError(f"{path!r} names a file on another host ({parts.netloc}): mount it and give its "
                              "local path")
        # (file:/x and file:///x alike; escapes decoded to the name's bytes: a name that is not
        # UTF-8, file:///caf%E9, is that name, not a replacement character)
        return os.fsdecode(unquote_to_bytes(parts.path)) or "/"
    return path


def local_path(value: str | os.PathLike, option: str, error=ConfigError) -> str | os.PathLike:
    """An option that must name a local path (`local_form`): a store URL is refused with
    `error`, saying so (it was taken for a relative folder named "az:" or "file:")."""
    try:
        value = local_form(value)
    except ConfigError as exc:
        raise error(f"{option} {exc}") from None
    if is_url(value):
        raise error(f"{option} {str(value)!r}: a local path is needed here, not a store URL")
    return value


def is_url(path) -> bool:
    """A store URL (scheme://...), not a local path or a file:// URL."""
    return isinstance(path, str) and "://" in path and not path.lower().startswith("file:")


def configure(options: dict | None) -> None:
    """The filesystem options of this process (the driver, or a worker through OptionsPlugin)."""
    global _options
    _options = dict(options or {})


def _options_plugin_class():
    """OptionsPlugin: a Dask worker plugin that hands the run's storage options to every worker
    (present and future); each worker then opens the store itself."""
    from distributed.diagnostics.plugin import WorkerPlugin

    class OptionsPlugin(WorkerPlugin):
        name = "dedupe-storage"

        def __init__(self, options: dict):
            self.options = dict(options)

        def setup(self, worker) -> None:
            configure(self.options)

    OptionsPlugin.__module__, OptionsPlugin.__qualname__ = __name__, "OptionsPlugin"
    return OptionsPlugin


def __getattr__(name: str):
    """`storage.OptionsPlugin`, made on first use: importing distributed costs ~0.4 s, which an
    in-process run (and every small folder) never needs. Cached, so pickling finds the same class."""
    if name == "OptionsPlugin":
        globals()[name] = _options_plugin_class()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _secret(key, value) -> bool:
    return any(w in str(key).lower() for w in SECRET_WORDS) or \
        (isinstance(value, str) and any(w in value.lower() for w in SECRET_VALUES))


def redacted(options: dict) -> dict:
    """storage.options for run.json: secret-looking values replaced by "***"."""
    def clean(key, value):
        if isinstance(value, dict):
            return {k: clean(k, v) for k, v in value.items()}
        return "***" if _secret(key, value) else value
    return {k: clean(k, v) for k, v in options.items()}


def command_line(argv: Sequence[str] | None = None) -> str:
    """The command as a lock records it (and another run's "in use by" message shows it), with
    the values of secret-looking `--set storage.options.*` keys, and any secret-looking value,
    replaced by "***" (`--set storage.options.account_key=...` put the key in OUT's lock)."""
    out = []
    for arg in sys.argv if argv is None else argv:
        text = str(arg)
        flag = "--set=" if text.startswith("--set=") else ""
        key, eq, value = text[len(flag):].partition("=")
        # (any storage.* value that names a secret-looking key anywhere in it: the README's form is
        # --set 'storage.options={"key": ..., "secret": ...}')
        if eq and key.strip().startswith("storage.") and (
                _secret(key, value) or any(w in value.lower() for w in SECRET_WORDS)):
            text = f"{flag}{key}=***"
        elif _secret("", text):
            text = "***"
        out.append(text)
    return " ".join(out)[:500]


def filesystem(url: str, options: dict | None = None):
    """(fsspec filesystem, path without the scheme) for `url`, with `options` (default: this
    process's, `configure`). ConfigError (exit 2) for an unknown scheme, a missing backend or
    options it refuses."""
    import fsspec
    protocol = url.split("://", 1)[0]
    try:
        cls = fsspec.get_filesystem_class(protocol)
    except ValueError:
        raise ConfigError(f"{url!r}: unknown storage scheme {protocol}:// (use a local path or an fsspec URL "
                          "such as s3://bucket/prefix, gs://..., az://...)") from None
    except ImportError as exc:
        raise ConfigError(f"{url!r}: the {protocol}:// backend is not installed ({exc}); install it, e.g. "
                          "pip install 'dedupe-pipeline[gcs]' or '[azure]' (s3fs ships with the package)") from None
    try:
        fs = cls(**(_options if options is None else options))
    except (TypeError, ValueError) as exc:
        # (a TypeError is an option the backend does not know; a ValueError, often, credentials it
        # found none of: adlfs with no account says so this way)
        raise ConfigError(f"storage.options are not accepted by the {protocol}:// backend, or it found no "
                          f"credentials ({exc}): fix storage.options in the config, or give the store's "
                          "credentials in its environment variables (AWS_*, GOOGLE_APPLICATION_CREDENTIALS, "
                          "AZURE_STORAGE_CONNECTION_STRING or AZURE_STORAGE_ACCOUNT_NAME, ...)") from None
    return fs, fs._strip_protocol(url).rstrip("/")


def location(url: str) -> tuple[str, str]:
    """Where a store URL points, whatever its spelling: (the backend's class, the path without
    scheme or trailing slash). az:// and abfs://, s3:// and s3a://, or a container written with
    its account's host, are one place: comparing the URLs' texts let a run scan its own OUT."""
    fs, path = filesystem(url)
    return f"{type(fs).__module__}.{type(fs).__qualname__}", path


def under(url: str, prefix: str) -> bool:
    """`url` lies under `prefix`, and is not `prefix` itself (both store URLs; see `location`)."""
    (kind, path), (base_kind, base) = location(url), location(prefix)
    return kind == base_kind and path != base and (path.startswith(base + "/") or not base)


def join(base: str | os.PathLike, *parts: str) -> str:
    """`base/part/...` for a URL or a local path (a local result is what str(Path(...)) gives)."""
    if is_url(base):
        return "/".join([str(base).rstrip("/"), *parts])
    return str(Path(base, *parts))


def _url(fs, path: str) -> str:
    return fs.unstrip_protocol(path)


def access_error(url: str, exc: Exception, what: str, option: str) -> ConfigError:
    """A store's refusal or silence as a ConfigError that says what to fix (exit 2)."""
    if isinstance(exc, TypeError):  # some backends check their options only when first used
        return ConfigError(f"storage.options are not accepted by the {url.split('://')[0]}:// backend ({exc}): "
                           "fix storage.options in the config")
    if isinstance(exc, PermissionError):
        why = ("access denied: check the credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / "
               "AWS_PROFILE for S3, or storage.options) and that they may read and write there")
    elif isinstance(exc, FileNotFoundError):
        why = "no such bucket or container: create it first, or fix the URL"
    else:
        why = f"the store did not answer as expected: {type(exc).__name__}: {exc}"
    return ConfigError(f"{what} {url!r} ({option}): {why}")


STORE_SLOW_S = 15.0  # a first call to a store unanswered this long is said to be waiting


@contextlib.contextmanager
def slow_answer_noted(url: str, what: str) -> Iterator[None]:
    """Logs a warning once when the calls inside take over STORE_SLOW_S: a store's client retries
    an endpoint that does not answer for a minute or more (Azure's ~90 s, GCS's ~35 s) before the
    error that stops the run, and the run looked hung meanwhile."""
    done = threading.Event()

    def note() -> None:
        if not done.wait(STORE_SLOW_S):
            log.warning("%s %s: no answer from the store after %.0f s (its client retries); if this goes on, "
                        "check the endpoint and the network (storage.options, AWS_ENDPOINT_URL, "
                        "STORAGE_EMULATOR_HOST, the connection string)", what, url, STORE_SLOW_S)
    threading.Thread(target=note, name="dedupe-store-wait", daemon=True).start()
    try:
        yield
    finally:
        done.set()


def check_input(url: str) -> None:
    """DATA on a store: the bucket answers and the prefix holds objects; ConfigError otherwise."""
    with slow_answer_noted(url, "input location"):
        _check_input(url)


def _check_input(url: str) -> None:
    fs, root = filesystem(url)
    if not root.strip("/"):  # (every path then lost its first character: "hotos/data/...")
        raise ConfigError(f"input location {url!r} names no bucket or container: pass DATA=<bucket/prefix of images>")
    try:
        found = fs.ls(root, detail=False, refresh=True)
    except FileNotFoundError:
        try:  # an empty prefix, or no bucket at all?
            fs.ls(root.split("/", 1)[0], detail=False, refresh=True)
        except Exception as exc:
            raise access_error(url, exc, "input location", "DATA") from None
        found = []
    except Exception as exc:  # credentials, network, a malformed bucket name
        raise access_error(url, exc, "input location", "DATA") from None
    if not found:
        raise ConfigError(f"input location {url!r} holds no objects: pass DATA=<bucket/prefix of images>")
    if all(f.rstrip("/") == root.rstrip("/") for f in found) and fs.isfile(root):
        # (one object's URL: its listing is itself, which the scan, listing what is under it,
        # skips; the run published an empty OUT over the last one and emptied the catalog)
        raise ConfigError(f"input location {url!r} is an object, not a prefix of objects: pass DATA=<the "
                          "bucket/prefix that holds the images>")


def iter_objects(url: str, cfg: ScanConfig, skip: Sequence[str] = ()) -> Iterator[scan.FileEntry]:
    """Every image object under `url`, as scan.iter_files gives local files: sorted, depth-first,
    streamed one listing call ("folder") at a time. abs_path is the object's URL. `skip`: URLs of
    prefixes not to go into (the run's own OUT, catalog and work prefix when they lie inside DATA)."""
    fs, root = filesystem(url)
    scheme = url.split("://", 1)[0]
    kind = location(url)[0]
    skipped = {path for path_kind, path in (location(p) for p in skip if is_url(p)) if path_kind == kind}
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            listed = sorted(fs.ls(folder, detail=True, refresh=True), key=lambda i: i["name"])
        except FileNotFoundError:
            continue  # a prefix emptied since its parent was listed
        fs.invalidate_cache(folder)  # s3fs keeps every listing otherwise: memory grows with the bucket
        subdirs = []
        for info in listed:
            name = info["name"].rstrip("/")
            base = name.rsplit("/", 1)[-1]
            if name == folder and info.get("type") == "directory" and info["name"] != name:
                # (keys with an empty-named folder, "a//b.jpg": the store's listing gives them
                # as a folder with the parent's own name, which cannot be listed apart)
                log.warning("objects under %s// (an empty-named folder in their keys) are not listed: "
                            "rename them without the double slash", _url(fs, folder))
            if not base or name == folder or (cfg.skip_hidden and base.startswith(".")):
                continue
            if info.get("type") == "directory":
                if name not in skipped:
                    subdirs.append(name)
                continue
            size = int(info.get("size") or 0)
            keep, error = _classify(fs, name, size, cfg)
            if "?versionId=" in name and scheme in ("s3", "s3a"):  # (s3fs reads the rest as a version id)
                keep, error = True, ("cannot read: the key holds '?versionId=', which the S3 client takes for an "
                                     "object version: rename the object")
            elif keep and fs._strip_protocol(_url(fs, name)).rstrip("/") != name:
                # (the tiers read an object by its URL: a name the client parses into another one,
                # e.g. adlfs's "a?b#c.jpg" -> "a#c.jpg?b", or drops characters of, tabs and line
                # breaks, was read as "deleted after it was listed", which it was not)
                error = (f"cannot read: the {scheme}:// client takes this name for another as a URL (a '?' "
                         "before a '#', or a control character): rename the object")
            if keep:
                mtime = _mtime(info)
                yield scan.FileEntry(name[len(root) + 1:], _url(fs, name), size, mtime, error,
                                     scan.mtime_ns_64(round(mtime * 1e9)), _etag(info))
        stack.extend(reversed(subdirs))


def _classify(fs, name: str, size: int, cfg: ScanConfig) -> tuple[bool, str | None]:
    """As scan.classify, but an object with an image extension is not read here (the screen
    reads it anyway and checks its content): a listing of millions makes no GET per object."""
    ext = os.path.splitext(name)[1].lower()
    if ext in scan.RAW_EXTENSIONS:
        return True, scan.RAW_ERROR
    ext_is_image = ext in cfg.image_extensions
    too_large = f"file too large: {size} bytes exceeds scan.max_file_bytes={cfg.max_file_bytes}"
    if ext_is_image:
        return True, too_large if size > cfg.max_file_bytes else None
    if size == 0:
        return False, None
    try:
        head = fs.cat_file(name, start=0, end=scan.SNIFF_BYTES)
    except OSError:
        return False, None
    found = scan.sniff(head)
    if found == "RAW":
        return True, scan.RAW_ERROR
    return bool(found), too_large if size > cfg.max_file_bytes else None


def _mtime(info: dict) -> float:
    """Last-modified time (seconds since the epoch) from an fsspec listing entry (S3, GCS, Azure)."""
    for key in ("LastModified", "last_modified", "updated", "mtime", "modified", "created"):
        value = info.get(key)
        if value is None:
            continue
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            value = datetime.fromisoformat(value.replace("Z", "+00:00"))
        if isinstance(value, datetime):
            return (value if value.tzinfo else value.replace(tzinfo=timezone.utc)).timestamp()
    return 0.0


def _etag(info: dict) -> str | None:
    """The object's entity tag from an fsspec listing entry (S3 "ETag", GCS and Azure "etag"),
    without its quotes; None when the backend lists none (fsspec's memory://).

    A PUT of other bytes gives a new tag even within the same second, which the last-modified
    time (1 s on S3) cannot tell apart. S3's tag is the MD5 of a single-part upload but not of a
    multipart one (a hash of the parts' MD5s), so it is compared with the same object's earlier
    tag only, never taken for a content hash; a metadata-only update may change it on GCS and
    Azure, which costs one read of that object."""
    for key in ("ETag", "etag"):
        value = info.get(key)
        if isinstance(value, str) and value.strip().strip('"'):
            return value.strip().strip('"')
    return None


def probe(url: str, write: bool = False) -> str | None:
    """Whether this process can open `url` with the options it was given (run on each Dask worker
    by `check_workers`): None, or what went wrong. One small request (an info call); a local
    folder is looked at (and, with `write`, checked for write permission)."""
    try:
        if not is_url(url):
            if not os.path.isdir(url):
                return f"no folder {url!r} there"
            if write and not os.access(url, os.W_OK | os.X_OK):
                return f"the folder {url!r} is not writable there"
            return None
        fs, path = filesystem(url)
        fs.info(path)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


PROBE_TIMEOUT_S = 60.0  # a worker whose store does not answer within this fails the check


async def probe_on_worker(url: str, write: bool = False) -> str | None:
    """`probe` on a Dask worker, off its event loop (a blocking call there would stall the worker)
    and within PROBE_TIMEOUT_S."""
    import asyncio
    try:
        return await asyncio.wait_for(asyncio.to_thread(probe, url, write), PROBE_TIMEOUT_S)
    except asyncio.TimeoutError:
        return f"no answer within {PROBE_TIMEOUT_S:.0f} s"


def check_workers(client, url: str, what: str = "input location", write: bool = False) -> None:
    """ConfigError (exit 2) when some Dask worker cannot open `url`, which this process could:
    workers that lack the store's credentials or endpoint would otherwise fail their first task
    with a traceback (or, without the endpoint, ask the public cloud for a bucket of that name);
    workers that do not see a local folder at the driver's path read every image as missing (a
    run of error rows, exit 0) or failed writing a tier's files."""
    answers = client.run(probe_on_worker, url, write, on_error="return")
    for worker, answer in list(answers.items()):
        if isinstance(answer, AttributeError):  # no probe_on_worker there: another version of the package
            raise ConfigError(f"the Dask worker at {worker} could not check that it can open {url} ({answer}): "
                              "every worker needs this package, at the driver's version")
        if isinstance(answer, BaseException):  # a worker leaving or starting: its tasks go elsewhere
            log.warning("the Dask worker at %s did not answer the store check (%s)", worker, answer)
            del answers[worker]
    bad = sorted((worker, error) for worker, error in answers.items() if error)
    if not bad:
        return
    worker, error = bad[0]
    verb, fix = ("open", "give every worker the store's credentials (its environment, profile or role: the "
                 "driver's environment variables do not reach the workers) and, for an S3-compatible server, the "
                 "endpoint (storage.options.endpoint_url in the config, which reaches every worker, or "
                 "AWS_ENDPOINT_URL in each worker's environment)") if is_url(url) else \
        ("use", "every worker needs DATA, OUT and the catalog at the same paths as this process (a shared file "
                "system mounted at the same place), or put them in object storage (README, running on a cluster)")
    raise ConfigError(f"{len(bad)} of {len(answers)} Dask workers cannot {verb} the {what} {url} (e.g. the worker "
                      f"at {worker}: {error}): {fix}")


@contextlib.contextmanager
def readable_errors(url: str) -> Iterator[None]:
    """A store's FileNotFoundError / PermissionError with a readable strerror (the screen and
    decode turn them into the row's error)."""
    try:
        yield
    except FileNotFoundError:
        raise FileNotFoundError(errno.ENOENT, "no such object (deleted after it was listed?)", url) from None
    except PermissionError:
        raise PermissionError(errno.EACCES, "access denied by the store", url) from None


def fresh_info(fs, path: str) -> dict:
    """An object's listing entry as the store has it now, not as a listing this process made
    (gcsfs answers from its listing cache even with refresh=True, and the workers write objects
    this process listed before)."""
    fs.invalidate_cache(path)
    return fs.info(path, refresh=True)


def size_and_tag_of(info: dict) -> tuple[int | None, str | None]:
    """The size and entity tag (`_etag`; None where the store gives none) in a listing entry."""
    size = info.get("size")
    return (None if size is None else int(size)), _etag(info)


def size_and_tag(fs, path: str) -> tuple[int | None, str | None]:
    """An object's size and entity tag as the store has them now (`fresh_info`)."""
    return size_and_tag_of(fresh_info(fs, path))


def read_bytes(url: str) -> bytes:
    """The whole object (errors as `readable_errors`)."""
    fs, path = filesystem(url)
    with readable_errors(url):
        return fs.cat_file(path)


def open_input(path):
    """A binary file object for a local path (any length) or an object URL (read whole)."""
    if is_url(path):
        return io.BytesIO(read_bytes(path))
    from pipeline import paths
    return paths.open_bytes(path)


def write_bytes(url: str, data: bytes) -> None:
    """One PUT: readers see the old object or the new one, never a part."""
    fs, path = filesystem(url)
    fs.pipe_file(path, data)


def write_whole(path: str, data: bytes) -> None:
    """`data` as the file or object `path`, seen whole or not at all by a reader: on a store one
    PUT (`write_bytes`), a local file written beside it and renamed over (folders made)."""
    if is_url(path):
        write_bytes(path, data)
        return
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.{uuid.uuid4().hex}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def remove_tree(url: str) -> None:
    fs, path = filesystem(url)
    with contextlib.suppress(FileNotFoundError):
        fs.rm(path, recursive=True)


def remove_folder(path: str | os.PathLike) -> None:
    """Delete a folder or a store prefix and everything in it (nothing if it is not there)."""
    if is_url(path):
        remove_tree(str(path))
    else:
        shutil.rmtree(path, ignore_errors=True)


def changed_since(urls, sizes, mtimes, etags=None) -> list[bool]:
    """scan.changed_since for objects: gone, or another size or last-modified time (an object is
    rewritten only by a new PUT, which sets both), or another ETag where both the scan and the
    listing now have one (`etags`: the scan's, None entries for none): a rewrite within the
    last-modified time's resolution (1 s on S3) keeps the size and time but not the tag."""
    by_folder: dict[str, dict] = {}
    flags = []
    for url, size, mtime, etag in zip(urls, sizes, mtimes, itertools.repeat(None) if etags is None else etags):
        fs, path = filesystem(url)
        folder = path.rsplit("/", 1)[0]
        if folder not in by_folder:
            fs.invalidate_cache(folder)  # adlfs answers ls from its cache even with refresh=True
            try:
                # (objects only: a key that is also a prefix, g.jpg beside g.jpg/x.jpg, is listed
                # twice, and the prefix's entry, of size 0, made the object "changed" at every run)
                by_folder[folder] = {i["name"]: i for i in fs.ls(folder, detail=True, refresh=True)
                                     if i.get("type") != "directory"}
            except OSError:
                by_folder[folder] = {}
        info = by_folder[folder].get(path)
        now = None if info is None else _etag(info)
        flags.append(info is None or int(info.get("size") or 0) != size or _mtime(info) != mtime
                     or (isinstance(etag, str) and now is not None and now != etag))
    return flags


def _lock_record(fs, lock: str) -> dict | None:
    """The lock object's content (pid, host, started, command, token) and its age in seconds by
    its last-modified time; None when there is no lock."""
    try:
        info = fs.info(lock, refresh=True)  # a fresh look: s3fs caches listings
    except FileNotFoundError:
        return None
    except OSError:
        info = {}
    try:
        record = json.loads(fs.cat_file(lock).decode("utf-8") or "{}")
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        record = {}
    modified = _mtime(info)
    record["age_s"] = time.time() - modified if modified else 0.0
    return record


def _holder(record: dict | None) -> str:
    if not record or "pid" not in record:
        return "another dedupe run"
    return (f"pid {record.get('pid')} on {record.get('host')}, started {record.get('started')}"
            f" ({record.get('command', '')})")


def _create_exclusive(fs, lock: str, data: bytes) -> None:
    """Create `lock`; FileExistsError when it exists."""
    try:
        with fs.open(lock, "xb") as fh:
            fh.write(data)
    except (ValueError, NotImplementedError):  # a backend without exclusive create
        log.warning("%s cannot create objects exclusively: two runs started at the same moment "
                    "could both take the lock of %s", fs.protocol, lock)
        if fs.exists(lock):
            raise FileExistsError(lock) from None
        fs.pipe_file(lock, data)


class _Lease(threading.Thread):
    """Renews the lock object every `refresh` seconds while the run holds it (same content: only
    its last-modified time moves). A lock found to hold another run's token was taken over (this
    run was stalled longer than the lease): renewing stops and the error is logged."""

    def __init__(self, fs, lock: str, data: bytes, token: str, refresh: float):
        super().__init__(name="dedupe-lock-lease", daemon=True)
        self.fs, self.lock, self.data, self.token, self.refresh = fs, lock, data, token, refresh
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.refresh):
            try:
                current = json.loads(self.fs.cat_file(self.lock).decode("utf-8") or "{}")
                if current.get("token") != self.token:
                    log.error("the lock %s was taken over by %s: this run stalled longer than its "
                              "lease; its outputs may race that run's", _url(self.fs, self.lock),
                              _holder(current))
                    return
                self.fs.pipe_file(self.lock, self.data)
            except FileNotFoundError:
                log.error("the lock %s was removed while this run held it", _url(self.fs, self.lock))
                return
            except Exception as exc:  # a store hiccup: try again at the next beat
                log.warning("could not renew the lock %s: %s", _url(self.fs, self.lock), exc)


@contextlib.contextmanager
def locked(out: str, name: str = LOCK_NAME, what: str = "output location", option: str = "--out",
           lease_s: float = LOCK_LEASE_S, refresh_s: float | None = None, also: str | None = None) -> Iterator[None]:
    """OUT's run lock on a store: the object OUT/.dedupe.lock, created exclusively, renewed every
    `refresh_s` (default: LOCK_REFRESH_S, at most a quarter of the lease), removed at the end. A lock
    left by a run that stopped renewing it `lease_s` ago is taken over (a warning names that run);
    a live one gives a ConfigError naming the holder (or saying what to fix when the lock cannot be
    made). (`name`, `what`, `option`: the same lock for another prefix, e.g. the catalog. `also`:
    the URL of another lock the same run takes next, e.g. its catalog's on a store, named in the
    message when it is there too: a killed run left both.)"""
    fs, root = filesystem(out)
    lock = f"{root}/{name}"
    token = uuid.uuid4().hex
    data = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                       "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                       "command": command_line(), "token": token}).encode("utf-8")
    try:
        try:
            with slow_answer_noted(out, what):
                _create_exclusive(fs, lock, data)
        except FileExistsError:
            record = _lock_record(fs, lock)
            if record is not None and record["age_s"] <= lease_s:
                raise
            if record is not None:
                log.warning("taking over the lock %s of %s: not renewed for %.0f s (lease %.0f s), "
                            "so that run is gone", _url(fs, lock), _holder(record), record["age_s"], lease_s)
                # remove only the lock judged stale: another run that took it over meanwhile has
                # written its own token
                again = _lock_record(fs, lock)
                if again is not None and again.get("token") == record.get("token"):
                    with contextlib.suppress(FileNotFoundError):
                        fs.rm_file(lock)
            _create_exclusive(fs, lock, data)
    except FileExistsError:
        other = ""
        with contextlib.suppress(Exception):
            other_fs, other_path = filesystem(also) if also else (None, None)
            if other_fs is not None and other_fs.exists(other_path):
                other = f", and {also} if that run held it too (it is there)"
        raise ConfigError(f"the {what} {out!r} is in use by {_holder(_lock_record(fs, lock))}: wait for "
                          f"that run to finish, or choose another {option} (a killed run's lock is taken "
                          f"over {lease_s:.0f} s after its last renewal; to go on now, once you know that "
                          f"run is gone, delete {_url(fs, lock)}{other})") from None
    except Exception as exc:
        raise access_error(out, exc, f"cannot write in the {what}", option) from None
    lease = _Lease(fs, lock, data, token, refresh_s if refresh_s is not None else min(LOCK_REFRESH_S, lease_s / 4))
    lease.start()
    try:
        yield
    finally:
        lease.stopped.set()
        lease.join()
        with contextlib.suppress(OSError):
            current = json.loads(fs.cat_file(lock).decode("utf-8") or "{}")
            if current.get("token") == token:  # never remove the lock of a run that took over
                fs.rm_file(lock)


# OUT's published names (outdir: links through `current`; on a store: copies of the generation's)
PUBLISHED = ("images.parquet", "pairs.parquet", "run.json", "report.html", "report")
# in a run's own OUT/_work-<pid> folder or prefix, made with it: only those holding it are a killed
# run's to remove (a user's `_work-2019` in an OUT given to a run is left alone)
WORK_MARK = ".dedupe-work"
# what the tiers make in a work folder: a run's folder the driver removed while a cluster's workers
# still wrote into it (a run stopped on an existing cluster) holds these, and not the mark
WORK_ENTRIES = re.compile(r"embed|orb|(?:orb|lists)-[0-9a-f]{12}")


def mark_work_folder(work: str | Path) -> None:
    """This run's OUT/_work-<pid> folder (or prefix), made and marked as a run's (`is_run_work_folder`)."""
    write_whole(join(work, WORK_MARK), f"{os.getpid()} {socket.gethostname()}\n".encode())


def is_run_work_folder(name: str, entries: list[str]) -> bool:
    """Whether OUT's `name` holding `entries` (their names) is a killed run's work folder."""
    return (name.startswith(WORK_PREFIX) and name[len(WORK_PREFIX):].isdigit()
            and (WORK_MARK in entries or (bool(entries) and all(WORK_ENTRIES.fullmatch(n) for n in entries))))


def written_by_a_run(run_json: bytes) -> bool:
    """`run_json` is a run.json this tool wrote (an OUT of the layout before generations)."""
    try:
        return json.loads(run_json.decode("utf-8")).get("tool") == "dedupe-pipeline"
    except (ValueError, AttributeError):
        return False


def _is_run_work_prefix(fs, prefix: str) -> bool:
    try:
        entries = [n.rstrip("/").rsplit("/", 1)[-1] for n in fs.ls(prefix, detail=False, refresh=True)]
    except FileNotFoundError:
        return False
    return is_run_work_folder(prefix.rsplit("/", 1)[-1], entries)


def remove_stale_work(out: str, keep: str | None = None) -> list[str]:
    """Work prefixes (OUT/_work-<pid>) of killed runs, those holding a run's mark (only while
    holding the lock); nothing else under OUT, whatever its name."""
    fs, root = filesystem(out)
    keep_path = filesystem(keep)[1] if keep and is_url(keep) else None
    removed = []
    try:
        listed = fs.ls(root, detail=False, refresh=True)
    except FileNotFoundError:
        return removed
    for name in sorted(listed):
        name = name.rstrip("/")
        base = name.rsplit("/", 1)[-1]
        if base.startswith(WORK_PREFIX) and name != keep_path and _is_run_work_prefix(fs, name):
            with contextlib.suppress(FileNotFoundError):
                fs.rm(name, recursive=True)
            removed.append(base)
    if removed:
        log.info("removed %d work prefix(es) left by killed runs: %s", len(removed), ", ".join(removed))
    return removed


def check_no_foreign_outputs(out: str) -> None:
    """ConfigError (exit 2, nothing changed) when OUT on the store holds objects under a name the
    run publishes (images.parquet, pairs.parquet, run.json, report.html, report/) and no run of
    this tool has published there: publishing overwrites those names and removes report/ objects
    the new report does not have. The run's first request to OUT: the store's refusal (options,
    credentials) is a ConfigError that says what to fix, as the lock's is."""
    try:
        with slow_answer_noted(out, "output location"):
            _check_no_foreign_outputs(out)
    except ConfigError:
        raise
    except Exception as exc:
        raise access_error(out, exc, "cannot read the output location", "--out") from None


def _check_no_foreign_outputs(out: str) -> None:
    fs, root = filesystem(out)
    try:
        _current(fs, root)
        return  # (OUT holds a run's outputs)
    except FileNotFoundError:
        pass
    try:
        listed = {n.rstrip("/").rsplit("/", 1)[-1] for n in fs.ls(root, detail=False, refresh=True)}
    except FileNotFoundError:
        return
    foreign = [n for n in PUBLISHED if n in listed]
    if "run.json" in listed:  # (the layout before generations: a run's own files)
        with contextlib.suppress(OSError):
            if written_by_a_run(fs.cat_file(f"{root}/run.json")):
                return
    if foreign:
        raise ConfigError(f"--out {_url(fs, root)} already holds {', '.join(foreign)}, which no run of this tool "
                          "published, and a run would replace them with its outputs: choose an empty prefix or a "
                          "previous run's OUT (nothing was changed)")


def _current(fs, root: str) -> str:
    """The name of OUT's current generation (`OUT/.dedupe/current`); FileNotFoundError if none."""
    return fs.cat_file(f"{root}/{STATE_DIR}/current").decode("utf-8").strip()


def read_outputs(out: str, options: dict | None = None) -> tuple[dict, "pd.DataFrame", "pd.DataFrame"]:
    """(run.json, images.parquet, pairs.parquet) of the run published to OUT on the store, read
    from the generation `OUT/.dedupe/current` names (one run's set, even while another run copies
    its files to the stable names); from OUT itself when there is no pointer. FileNotFoundError
    when OUT holds no finished run. `options`: as for `filesystem`."""
    import pandas as pd
    fs, root = filesystem(out, options)
    try:
        base = f"{root}/{STATE_DIR}/{_current(fs, root)}"
    except FileNotFoundError:
        base = root
    try:
        manifest = json.loads(fs.cat_file(f"{base}/run.json").decode("utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{out}/run.json not found: {out} is not the output location of a finished run") \
            from None
    frames = []
    for name in ("images.parquet", "pairs.parquet"):
        with fs.open(f"{base}/{name}", "rb") as fh:
            frames.append(pd.read_parquet(fh))
    return manifest, frames[0], frames[1]


def republish_report(out: str, run_id: str, write_report, of_run: str | None = None) -> str:
    """`dedupe report` on a store: a new generation holding the current one's run.json and Parquet
    files (the same bytes: copied on the server where the backend copies there, else downloaded)
    and a report made again by `write_report(folder, last)` (`last`: what `last_generation` gives,
    whose thumbnails and drawings of the same bytes and settings are carried over), published as a
    run publishes, under OUT's lock; the files OUT already holds are not copied again. `run_id`:
    the new generation's name (gen-<run_id>). `of_run`: the run_id the report was made for
    (ConfigError when another run has published since). Returns its URL."""
    from pipeline.report import DRAW_INDEX, THUMB_INDEX
    fs, root = filesystem(out)
    names = ("images.parquet", "pairs.parquet", "run.json")
    with locked(out), last_generation(out, (THUMB_INDEX, DRAW_INDEX)) as last:
        try:
            gen = f"{root}/{STATE_DIR}/{_current(fs, root)}"
        except FileNotFoundError:
            raise FileNotFoundError(f"{out}/{STATE_DIR}/current not found: {out} holds no published run") from None
        found = json.loads(fs.cat_file(f"{gen}/run.json").decode("utf-8")).get("run_id")
        if of_run is not None and found != of_run:
            raise ConfigError(f"{out} was published by another run ({found}) while the report was "
                              "being made: run `dedupe report` again")
        on_server = isinstance(last, LastReport) and last.generation == gen
        if on_server:
            last.carry_outputs(names)

        def write(folder: Path) -> None:
            if not on_server:
                fs.get([f"{gen}/{name}" for name in names], [str(folder / name) for name in names])
            write_report(folder, last)
        return publish(out, run_id, write, last=last)


class LastReport:
    """The report of OUT's current generation on the store, for a run that reuses its thumbnails
    and drawings: its indexes (`indexes`, e.g. thumbs.json) copied to `folder`, a local temporary
    folder, and the names of its other files (one listing), which stay on the store. The report
    `carry`s a file of unchanged bytes and settings instead of making it again; `publish` then
    copies it into the new generation on the server (no download, no upload)."""

    def __init__(self, folder: Path, generation: str, present: set[str]):
        self.folder = folder  # the indexes, read by the report (report._made_index)
        self.generation = generation  # the generation's folder on the store (a path of its filesystem)
        self._present = present  # its report's files, relative to the report (e.g. "thumbs/123.jpg")
        self.carried: list[str] = []  # names relative to the generation, copied into the next one

    def carry(self, name: str) -> bool:
        """Reuse `name` (relative to the report folder, e.g. "thumbs/123.jpg") if the last report
        has it: True when it will be in the new generation."""
        if name not in self._present:
            return False
        self.carried.append(f"report/{name}")
        return True

    def carry_outputs(self, names) -> None:
        """The generation's own files (`names` relative to it, e.g. run.json) go into the next
        one too (a report rebuilt for the same run)."""
        self.carried.extend(names)


# backends that copy on the server, finished when `server_copy` returns: S3 CopyObject and GCS
# rewrite by themselves, Azure's Copy Blob (which may answer "pending") waited for by `_azure_copy`
SERVER_COPY = ("s3", "s3a", "gs", "gcs", "abfs", "az", "abfss")
AZURE_COPY_POLL_S = 0.2  # between status checks of a pending Copy Blob
AZURE_COPY_TIMEOUT_S = 600.0  # a copy still pending after this is aborted, and the publish fails
AZURE_COPIES_AT_ONCE = 64


def _speaks(fs, protocols: tuple[str, ...]) -> bool:
    """Is `fs` a filesystem of one of `protocols` (fsspec gives one name or a tuple of aliases)?"""
    return any(p in protocols for p in ((fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol))


def _is_azure(fs) -> bool:
    return _speaks(fs, ("abfs", "az", "abfss"))


def server_copy(fs, sources: list[str], targets: list[str]) -> None:
    """Copy each source object to its target on the server (no bytes through this process), every
    copy finished when this returns. FileNotFoundError when a source is missing."""
    if _is_azure(fs):
        from fsspec.asyn import sync
        sync(fs.loop, _azure_copy, fs, sources, targets)
    else:
        fs.copy(sources, targets)


async def _azure_copy(fs, sources: list[str], targets: list[str]) -> None:
    """Azure's Copy Blob, waited for: within one account it usually answers "success", but it may
    answer "pending" and go on in the background (adlfs's copy returns then), and a pending blob is
    not yet the source's bytes. Polls each pending copy until it ends; OSError if one fails."""
    import asyncio
    from azure.core.exceptions import ResourceNotFoundError
    gate = asyncio.Semaphore(AZURE_COPIES_AT_ONCE)

    def blob(path: str):
        container, name, _ = fs.split_path(path)
        return fs.service_client.get_container_client(container).get_blob_client(name)

    async def one(source: str, target: str) -> None:
        async with gate:
            into = blob(target)
            try:
                status = (await into.start_copy_from_url(blob(source).url)).get("copy_status")
            except ResourceNotFoundError:
                raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), source) from None
            deadline = time.monotonic() + AZURE_COPY_TIMEOUT_S
            while status == "pending":
                if time.monotonic() > deadline:
                    props = await into.get_blob_properties()
                    with contextlib.suppress(Exception):
                        await into.abort_copy(props.copy.id)
                    raise OSError(f"the copy of {source} to {target} on the store was still pending after "
                                  f"{AZURE_COPY_TIMEOUT_S:.0f} s: aborted; run again")
                await asyncio.sleep(AZURE_COPY_POLL_S)
                status = (await into.get_blob_properties()).copy.status
            if status not in ("success", None):
                raise OSError(f"the copy of {source} to {target} on the store ended {status!r}")

    await asyncio.gather(*(one(a, b) for a, b in zip(sources, targets)))
    fs.invalidate_cache()


@contextlib.contextmanager
def last_generation(out: str, indexes: tuple[str, ...]) -> Iterator[LastReport | Path | None]:
    """The report of OUT's current generation on the store, for the new report to reuse: a
    LastReport (its `indexes` in a temporary folder; two small GETs and a listing, not a GET of
    every thumbnail) where the backend copies on the server (SERVER_COPY), else a local copy of
    the report's files (a folder); None when there is none or it cannot be read (then everything
    is made again). The temporary folder is removed on exit."""
    fs, root = filesystem(out)
    on_server = _speaks(fs, SERVER_COPY)
    with tempfile.TemporaryDirectory(prefix="dedupe-last-") as tmp:
        try:
            gen = f"{root}/{STATE_DIR}/{_current(fs, root)}"
            fs.invalidate_cache(f"{gen}/report")
            present = {p[len(gen) + len("/report/"):] for p in fs.find(f"{gen}/report")}
            wanted = [name for name in present if name in indexes or not on_server]
            if wanted:  # one batch call (concurrent requests)
                fs.get([f"{gen}/report/{name}" for name in wanted], [str(Path(tmp, name)) for name in wanted])
        except Exception as exc:  # no generation yet, or a failed read (never a partial index reused)
            if not isinstance(exc, FileNotFoundError):
                log.warning("the last report could not be read (%s); its thumbnails are made again", exc)
            yield None
            return
        yield LastReport(Path(tmp), gen, present - set(indexes)) if on_server else Path(tmp)


def content_tag(info: dict) -> str | None:
    """A digest of an object's bytes from its listing entry, for telling whether two objects
    hold the same bytes: S3's ETag (the MD5 of a single-part upload; another form for a multipart
    one or under SSE-KMS, which two different objects still never share), GCS's md5Hash, Azure's
    Content-MD5 (set by the service for a blob uploaded in one Put Blob, as OUT's files are, and
    kept by a copy); None where the backend lists none (Azure's and GCS's "etag" change with every
    write, content or not, and are never compared across objects)."""
    settings = info.get("content_settings")  # (adlfs: the SDK's ContentSettings, or a dict)
    md5 = getattr(settings, "content_md5", None) or (settings.get("content_md5") if isinstance(settings, dict) else None)
    if isinstance(md5, (bytes, bytearray)) and md5:
        import base64
        return "md5:" + base64.b64encode(bytes(md5)).decode("ascii")
    for key, prefix in (("md5Hash", "md5:"), ("ETag", "etag:")):
        value = info.get(key)
        if isinstance(value, str) and value.strip().strip('"'):
            return prefix + value.strip().strip('"')
    return None


def _tags(fs, prefix: str) -> dict[str, str | None]:
    """Relative name -> content_tag of every object under `prefix` (one listing; {} if none)."""
    fs.invalidate_cache(prefix)
    try:
        found = fs.find(prefix, detail=True)
    except FileNotFoundError:
        return {}
    return {name[len(prefix) + 1:]: content_tag(info) for name, info in found.items()
            if info.get("type", "file") != "directory"}


def publish(out: str, run_id: str, write, last: LastReport | Path | None = None,
            commit_point=contextlib.nullcontext) -> str:
    """`write(folder)` fills a local temporary folder; its files become OUT's outputs on the store
    (see the module docstring for the order and what a reader sees), with the report files `last`
    carried (LastReport.carry) copied into the new generation on the server. Files whose bytes
    OUT already holds under the same name (`content_tag`: e.g. an unchanged thumbnail) are not
    copied to it again. Returns the generation URL."""
    fs, root = filesystem(out)
    gen_name = f"gen-{run_id}"
    gen = f"{root}/{STATE_DIR}/{gen_name}"
    with tempfile.TemporaryDirectory(prefix="dedupe-publish-") as tmp:
        folder = Path(tmp) / gen_name
        folder.mkdir()
        write(folder)
        names = sorted((p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()),
                       key=lambda n: (n == "run.json", n))  # run.json last
        head = names[:-1] if names and names[-1] == "run.json" else names
        carried = sorted(last.carried, key=lambda n: (n == "run.json", n)) if isinstance(last, LastReport) else []
        try:  # many small report files: one batch call (concurrent requests), run.json after them
            if head:
                fs.put([str(folder / n) for n in head], [f"{gen}/{n}" for n in head])
            for batch in ([n for n in carried if n != "run.json"], [n for n in carried if n == "run.json"]):
                if not batch:  # server-side copies from the last generation
                    continue
                try:
                    server_copy(fs, [f"{last.generation}/{n}" for n in batch], [f"{gen}/{n}" for n in batch])
                except FileNotFoundError as exc:
                    raise OSError(f"a file of the last generation vanished from {_url(fs, last.generation)} "
                                  f"during the run ({exc}); nothing was published: run again (the next run "
                                  "makes it anew)") from exc
            if names[len(head):]:
                fs.put([str(folder / n) for n in names[len(head):]], [f"{gen}/{n}" for n in names[len(head):]])
        except BaseException:
            with contextlib.suppress(Exception):
                fs.rm(gen, recursive=True)
            raise
    try:
        previous = _current(fs, root)
    except FileNotFoundError:
        previous = None
    with commit_point():  # (the run's: progress.commit_point)
        fs.pipe_file(f"{root}/{STATE_DIR}/current", gen_name.encode("utf-8"))  # the commit point
    try:
        _copy_to_stable_names(fs, root, gen, gen_name, previous, names, carried)
    except BaseException as exc:  # (the CLI must not say the previous outputs are untouched)
        exc.published = (f"the new outputs were published ({_url(fs, root)}/{STATE_DIR}/current names "
                         f"{gen_name}: load_run, plan and report read them), but their copies under OUT's "
                         "stable names did not all complete, so the files at OUT's top level may mix two runs "
                         "until the next run copies them again")
        raise
    return _url(fs, gen)


def _copy_to_stable_names(fs, root: str, gen: str, gen_name: str, previous: str | None, names: list[str],
                          carried: list[str]) -> None:
    """After the commit point: the generation's files copied to OUT's stable names, then older
    report pages and generations removed."""
    # the stable names: only those whose bytes differ from what OUT holds (a listing of each side;
    # the generation's also lets the copies skip a HEAD per object), run.json last
    published = sorted(set(names) | set(carried), key=lambda n: (n == "run.json", n))
    made = _tags(fs, gen)
    held = {f"report/{n}": tag for n, tag in _tags(fs, f"{root}/report").items()}
    fs.invalidate_cache(root)  # (adlfs answers ls from its cache even with refresh=True)
    with contextlib.suppress(FileNotFoundError):
        held.update((info["name"].rstrip("/").rsplit("/", 1)[-1], content_tag(info))
                    for info in fs.ls(root, detail=True, refresh=True) if info.get("type") == "file")
    todo = [n for n in published if made.get(n) is None or made.get(n) != held.get(n)]
    head = [n for n in todo if n != "run.json"]
    for batch in (head, todo[len(head):]):  # server-side copies, batched; run.json last
        if batch:
            server_copy(fs, [f"{gen}/{n}" for n in batch], [f"{root}/{n}" for n in batch])
    # report pages of an older run that this one does not have
    kept = set(published)
    stale = [f"{root}/{n}" for n in held if n.startswith("report/") and n not in kept]
    if stale:
        with contextlib.suppress(FileNotFoundError):
            fs.rm(stale)
    fs.invalidate_cache(f"{root}/{STATE_DIR}")
    with contextlib.suppress(FileNotFoundError):
        for path in fs.ls(f"{root}/{STATE_DIR}", detail=False, refresh=True):
            name = path.rstrip("/").rsplit("/", 1)[-1]
            if name.startswith("gen-") and name not in (gen_name, previous):
                fs.rm(path, recursive=True)
