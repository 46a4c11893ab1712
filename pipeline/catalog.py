"""The catalog: what a run learnt, kept between runs so the next one redoes only what changed.

A folder or an object-store prefix (default `OUT/catalog`, `catalog:` in the config, `--catalog
DIR|URL`; any fsspec URL, pipeline/storage.py), laid out the same either way:

    manifest.json                      the only entry point: generation, DATA root, settings
                                       fingerprints, and every file below with its size and sha256
    tables/images-<gen>.parquet        per file: path, size, mtime_ns, ETag (objects on a store),
                                       sha256, decode facts, hashes with their variants (the
                                       screen's `codes`), error, screen_fp
    tables/neighbours-<gen>.parquet    each image's K nearest (owner, neighbour paths, distance)
    tables/evidence-<gen>.parquet      per pair of CONTENTS (sha256 a, sha256 b, transform): the ORB
                                       numbers with the fingerprint of the settings that made them,
                                       the cosine with the embedding settings' fingerprint
    tables/features-<gen>.parquet      index of the per-content features: kind (orb | embed),
                                       fingerprint, sha256, transform, key, part file, error
    features/<kind>/<fp>/<run>/.../part-N.parquet   ORB descriptors / embeddings, read by key
                                       (`pipeline.store`), never all at once

Features and pair evidence are keyed by content (sha256 + transform), so a renamed or moved file
costs nothing. The key used by the feature files is `content_id(sha256) * 8 + transform`
(content_id: the first 60 bits of the sha256).

Safety. Only a run holding `.catalog.lock` writes (locally a flock, like OUT's lock; on a store an
object created exclusively, like OUT's lock there). Files are never modified: a run writes new
files, then replaces `manifest.json` atomically (locally a rename; on a store one PUT, which
readers see whole or not at all), so the manifest is the commit point. A run killed at any
point leaves the last manifest and every file it names intact; files named by no manifest are
removed by a later commit (the previous generation's files are kept one more generation, for
readers such as `dedupe query` that opened the previous manifest). Every file is checked against
its sha256 in the manifest before it is trusted (tables when the catalog is opened, feature parts
before a run reads them); a mismatch is logged, listed in run.json (`reuse.problems`) and the
affected records are recomputed.

One code path serves both: `_Files` reads, lists and removes through an fsspec filesystem (local
folders through fsspec's LocalFileSystem); only a write differs (locally a temporary name, fsync
and rename; on a store a single PUT, atomic by itself).
"""
from __future__ import annotations

import ast
import contextlib
import hashlib
import io
import itertools
import json
import logging
import os
import tempfile
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import outdir, paths, storage, store
from pipeline.config import Config, ConfigError

log = logging.getLogger("pipeline")

FORMAT = 1
MANIFEST = "manifest.json"
LOCK_NAME = ".catalog.lock"
DISABLED = ("none", "off", "false", "no")

IMAGE_COLUMNS = ["path", "bytes", "mtime_ns", "etag", "sha256", "width", "height", "format", "hash", "error",
                 "codes", "variant_mask", "screen_fp"]
# columns added since FORMAT 1's first tables: an older table lacks them and is read with nulls (a
# reader that predates them selects its own columns), so they need no new format
ADDED_COLUMNS = {"images": ["etag"]}
NEIGHBOUR_COLUMNS = ["owner", "neighbour", "hash_distance"]
# (the evidence's "transform": the pair's own, + 8 when it was checked both ways,
# `verify.evidence_transforms`)
EVIDENCE_COLUMNS = ["sha_a", "sha_b", "transform", "orb_fp", "orb_matches", "orb_inliers", "orb_score",
                    "orb_status", "orb_reason", "ssim", "hist_corr", "embed_fp", "cosine"]
FEATURE_COLUMNS = ["kind", "fp", "sha256", "transform", "key", "part", "error"]
TABLE_COLUMNS = {"images": IMAGE_COLUMNS, "neighbours": NEIGHBOUR_COLUMNS, "evidence": EVIDENCE_COLUMNS,
                 "features": FEATURE_COLUMNS}
# Feature parts are compacted at commit (per kind and settings) when more than this many part
# files are small, under half of COMPACT_ROWS_PER_PART rows (a nightly run adds a few small ones;
# a large run's parts are full, and rewriting them would only copy every descriptor) ...
COMPACT_MAX_PARTS = 64
# ... or when more than this fraction of their stored rows belong to contents no longer present.
COMPACT_DEAD_FRACTION = 0.5
COMPACT_ROWS_PER_PART = 256  # rows per compacted part (as a run writes them: dask.partition_size)
# rows per row group of a table (the commit converts and writes a group at a time: the whole
# table never exists as Arrow, nor its file in memory). A group of the evidence made and written
# was +18-28 MB of the driver at 65,536 rows, the commit being its peak at 100k files; +4 MB at
# 16,384 (RSS probe of a 10k-file run: the commit's rise 52 -> 28 MB), for an evidence file
# ~20 % larger (smaller groups compress the repeated sha256 texts less well)
TABLE_ROWS_PER_GROUP = 16_384
ENTRY_READERS = 4  # new parts the commit reads at once for their size and sha256
# text columns read as categoricals (one string per distinct value, an integer code per row): the
# evidence and neighbour tables repeat each content, path, fingerprint and reason on many rows and
# are read whole by a re-run; plain text was ~1.8 kB per image at 10k files (evidence 18.4 -> 4.9 MB)
DICTIONARY_COLUMNS = {"evidence": ["sha_a", "sha_b", "orb_fp", "orb_status", "orb_reason", "embed_fp"],
                      "neighbours": ["owner", "neighbour"]}
# the verify tier's evidence (keypoints, and the pixel check's numbers for flat pairs)
ORB_COLUMNS = ["orb_matches", "orb_inliers", "orb_score", "orb_status", "orb_reason", "ssim", "hist_corr"]


# ---------------------------------------------------------------------------------------------
# where, and under which settings


def resolve(cfg: Config, out: Path | str) -> Path | str | None:
    """The catalog folder (a Path) or store prefix (a URL) for this run: None when disabled
    (`catalog: none`). Default: OUT/catalog, on the store when OUT is."""
    value = storage.local_form((cfg.catalog or "").strip())
    if value.lower() in DISABLED:
        return None
    if value:  # (absolute: a cluster's workers write its features from their own folders)
        return value.rstrip("/") if storage.is_url(value) else Path(os.path.abspath(value))
    return storage.join(out, "catalog") if storage.is_url(out) else Path(os.path.abspath(out)) / "catalog"


class _Files:
    """The catalog's files by relative name ("tables/images-x.parquet"), in a local folder or under
    a store prefix, through one fsspec filesystem (LocalFileSystem for a folder). `full` gives what
    the stages read and write (a local path, or an object URL the workers open themselves)."""

    def __init__(self, location: Path | str):
        self.remote = storage.is_url(location)
        if self.remote:
            self.fs, self.base = storage.filesystem(str(location))
            self.location: Path | str = str(location).rstrip("/")
        else:
            from fsspec.implementations.local import LocalFileSystem
            self.fs = LocalFileSystem()
            self.location = Path(location)
            self.base = self.fs._strip_protocol(str(Path(location).absolute())).rstrip("/")

    def full(self, rel: str) -> str:
        return f"{self.location}/{rel}" if self.remote else str(self.location / rel)

    def rel(self, full: str) -> str:
        """The relative name of a path or URL under the catalog (local paths resolved: links)."""
        if self.remote:
            prefix = f"{self.location}/"
            if not str(full).startswith(prefix):
                raise ValueError(f"{full!r} is not under the catalog {self.location!r}")
            return str(full)[len(prefix):]
        return str(Path(full).resolve().relative_to(Path(self.location).resolve()))

    def _path(self, rel: str) -> str:
        return f"{self.base}/{rel}"

    def read(self, rel: str) -> bytes:
        return self.fs.cat_file(self._path(rel))

    def stat(self, rel: str) -> tuple[int | None, str | None] | None:
        """(size, entity tag) of an object on a store, asked afresh (None when there is none);
        the tag is None where the store gives none (storage._etag)."""
        try:
            return storage.size_and_tag(self.fs, self._path(rel))
        except (FileNotFoundError, IsADirectoryError):
            return None

    def read_or_none(self, rel: str) -> bytes | None:
        """The file's bytes, None when there is none (read, not looked up in a cached listing:
        the workers write objects this process has not listed)."""
        try:
            return self.read(rel)
        except (FileNotFoundError, IsADirectoryError):
            return None

    def table(self, rel: str, columns: list[str] | None = None) -> pa.Table:
        if self.remote and columns is not None:  # those columns' spans only (a part's keys: ~kB of ~11 MB)
            footer, size = store.read_footer(self.full(rel))
            meta = store.parse_footer(footer)
            return store.open_ranges(self.full(rel), meta, size, list(range(meta.num_row_groups)),
                                     columns).read(columns=columns)
        if self.remote:  # one GET, then parsed in memory
            return pq.read_table(io.BytesIO(self.read(rel)), columns=columns)
        return pq.read_table(self.full(rel), columns=columns)

    def num_rows(self, rel: str) -> int:
        """Rows in a Parquet file; 0 when it cannot be read (compaction then checks and drops it)."""
        try:
            with self.fs.open(self._path(rel), "rb") as fh:  # the footer only
                return pq.ParquetFile(fh).metadata.num_rows
        except Exception:
            return 0

    def write(self, rel: str, data: bytes, durable: bool = False) -> None:
        """Readers see the old file or the new one, never a part: one PUT on a store; locally a
        temporary name, renamed over (fsynced, with its folder, when `durable`)."""
        if self.remote:
            self.fs.pipe_file(self._path(rel), data)
            return
        path = self.location / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                if durable:
                    fh.flush()
                    os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        if durable:
            _fsync_dir(path.parent)

    def write_table(self, rel: str, frame: pd.DataFrame | EvidenceTable) -> dict:
        """`frame` as the Parquet file `rel`, TABLE_ROWS_PER_GROUP rows converted and written at a
        time into a local temporary file, then renamed over (a folder) or put as one object (a
        store; multipart for a big file, visible only once whole). A table made as it is written
        (`EvidenceTable.parts`) comes a group at a time. Returns its manifest entry (file, bytes,
        sha256)."""
        if isinstance(frame, pd.DataFrame):
            frame = frame.reset_index(drop=True)
            schema = _schema_of(frame)
            groups = (frame.iloc[start:start + TABLE_ROWS_PER_GROUP] for start in range(0, len(frame), TABLE_ROWS_PER_GROUP))
        else:
            groups = frame.parts()
            first = next(groups)
            # the first group's types; a text column that is all None there is still text
            schema = pa.Schema.from_pandas(first, preserve_index=False)
            for i, f in enumerate(schema):
                if pa.types.is_null(f.type):
                    schema = schema.set(i, pa.field(f.name, pa.string()))
            groups = itertools.chain([first], groups)
        if self.remote:  # written locally first
            tmp = Path(tempfile.gettempdir()) / f".dedupe-catalog-{uuid.uuid4().hex}.parquet.tmp"
        else:
            path = self.location / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        try:
            with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
                for part in groups:
                    if len(part):
                        writer.write_table(pa.Table.from_pandas(part, schema=schema, preserve_index=False),
                                           row_group_size=TABLE_ROWS_PER_GROUP)
            with open(tmp, "rb") as fh:
                entry = {"file": rel, "bytes": os.fstat(fh.fileno()).st_size,
                         "sha256": hashlib.file_digest(fh, "sha256").hexdigest()}
            if self.remote:
                self.fs.put_file(str(tmp), self._path(rel))
            else:
                os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
            # Arrow's allocator keeps what the conversion freed; give it back, so the tables'
            # conversions do not stack up under the driver's peak (measured: -25 MB at 10k files)
            pa.default_memory_pool().release_unused()
        return entry

    def find(self, sub: str, pattern: str = "") -> list[str]:
        """Relative names of the files under `sub` (recursively) whose base name starts with
        `pattern`, sorted."""
        base = self._path(sub).rstrip("/")
        if self.remote:
            self.fs.invalidate_cache(base)  # workers wrote objects this process has not listed
        try:
            found = self.fs.find(base)
        except FileNotFoundError:
            return []
        out = []
        for name in found:
            rel = name[len(self.base) + 1:]
            if name.startswith(f"{self.base}/") and rel.rsplit("/", 1)[-1].startswith(pattern):
                out.append(rel)
        return sorted(out)

    def remove(self, rel: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self._path(rel))

    def remove_empty_folders(self, sub: str) -> None:
        """Local folders left empty (a store has no folders)."""
        if self.remote:
            return
        base = self.location / sub
        for path in sorted(base.rglob("*"), reverse=True) if base.exists() else []:  # deepest first
            if path.is_dir() and not any(path.iterdir()):
                path.rmdir()


def _schema_of(frame: pd.DataFrame) -> pa.Schema:
    """The Arrow schema pyarrow infers for `frame` (types and pandas metadata), from the rows
    holding each column's first value: inferring it from the whole frame converts every object
    column into Arrow to learn its type (the images table's hash codes and texts, ~12 MB at 100k
    files, briefly, at the commit). A text column that is all None in the first rows is still
    text; one that is None throughout has the null type, as from the whole frame. When an object
    column's first value is not text or bytes (a number, where a later float makes the whole
    column double; a list; a dict), the schema is inferred from the whole frame, as before."""
    rows = {0}
    for column in frame.columns:
        if len(frame) and frame[column].dtype == object:
            rows.add(int(frame[column].notna().to_numpy().argmax()))
    schema = pa.Schema.from_pandas(frame.iloc[sorted(rows)] if len(frame) else frame, preserve_index=False)
    plain = (pa.types.is_string, pa.types.is_large_string, pa.types.is_binary, pa.types.is_null)
    if any(frame[f.name].dtype == object and not any(is_(f.type) for is_ in plain) for f in schema):
        return pa.Schema.from_pandas(frame, preserve_index=False)
    return schema


def _fp(data) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


# verify keys that only affect matching and the verdict, not the per-image ORB features
_ORB_MATCH_ONLY = {"ratio", "min_keypoints", "ransac_threshold", "model", "ransac_max_iters",
                   "ransac_confidence", "min_good_matches", "match_inliers", "reject_inliers", "seed",
                   "min_coverage", "region_mismatch", "min_inlier_share", "chance_min_matches",
                   "semi_flat_share", "semi_flat_ssim", "blank_max_shift", "blank_min_hist_corr"}
_NO_EFFECT = {"opencv_threads", "max_open_partitions", "download", "batch_size", "threads"}
_SCREEN_SEARCH = {"max_distance", "max_candidates", "backend", "exact_group_pairs", "mode", "embedding_k",
                  "embedding_min_cosine", "embedding_index", "embedding_exact_max", "embedding_nprobe",
                  "embedding_shard_size", "dihedral_max_distance", "search_sharding", "search_shard_size"}


# the code and libraries that make each kind of result: a new version of either invalidates it (of
# the code, its syntax without docstrings and comments, and without the definitions a module lists
# in NOT_FINGERPRINTED: `source_fingerprint`)
# (decode.py's libraries, in every kind that decodes: Pillow, its HEIC plugin, OpenCV's TIFF
# fallback; the screen's aHash is imagehash, its pHash SciPy's DCT, its wHash PyWavelets. Tests
# check that every library the fingerprinted code imports is listed)
_DECODE_LIBS = ["pillow", "pillow-heif", "opencv-python-headless", "opencv-python", "numpy", "simplejpeg"]
_CODE = {"screen": (["screen.py", "decode.py", "borders.py"], [*_DECODE_LIBS, "imagehash", "scipy", "PyWavelets"]),
         "orb_features": (["verify.py", "decode.py"], _DECODE_LIBS),
         # how a pair is judged from stored features (verify.py's PAIR_CHECK_ONLY, which the
         # features' fingerprint leaves out: _SKIP_LISTS); part of the pair evidence's key
         "orb_check": (["verify.py"], _DECODE_LIBS),
         # the descriptor matcher's module (its search kernels left out: an edit to the matcher,
         # or a new numba, re-scores the stored pairs, never their features)
         "orb_match": (["hamming.py"], ["numba", "llvmlite", "numpy"]),
         # (weights.py: each backbone's input preprocessing)
         "embed": (["confirm.py", "decode.py", "borders.py", "weights.py"],
                   [*_DECODE_LIBS, "tensorflow-cpu", "tensorflow", "keras", "ai-edge-litert"]),
         # the K-nearest lists a re-run reuses: the candidate search (its embedding kNN and pair
         # making left out: neither is stored), the index backends and their kernels (hamming.py
         # whole: the search kernels it leaves out of the matcher's fingerprint make the lists)
         "neighbours": (["candidates.py", "search.py", "hamming.py"], ["numba", "llvmlite", "numpy"])}
# modules a kind reads whole, its NOT_FINGERPRINTED list ignored (that list is the other kinds')
_WHOLE = {"neighbours": {"hamming.py"}}
# modules a kind reads without more than their NOT_FINGERPRINTED definitions: the per-image
# features leave out the code that only judges pairs (an edit there re-checks stored pairs and
# recomputes no image's features; every earlier edit to verify.py recomputed both)
_SKIP_LISTS = {"orb_features": {"verify.py": ("NOT_FINGERPRINTED", "PAIR_CHECK_ONLY")}}


FINGERPRINT_SKIP_LIST = "NOT_FINGERPRINTED"


def source_fingerprint(text: str, skip_listed: bool | tuple[str, ...] = True) -> str:
    """The hash of `fingerprinted_syntax`: what of a module's source keys the results it computes."""
    return hashlib.sha256(ast.unparse(fingerprinted_syntax(text, skip_listed)).encode()).hexdigest()


def fingerprinted_syntax(text: str, skip_listed: bool | tuple[str, ...] = True) -> ast.Module:
    """What of a module's source keys the results it computes: its syntax (`ast.unparse`: no
    comments, no layout) without docstrings and without the top-level definitions the module names
    in a tuple `NOT_FINGERPRINTED` (the code that only cuts, sends and collects a tier's tasks, which
    changes often and shapes no feature or score). The module's whole bytes were hashed before:
    each of verify.py's 45 commits made every catalog compute its ORB features and re-verify its
    pairs again; replayed with today's list, 14 of them (plumbing or comments only) change
    nothing. So that such a list cannot hide code that shapes a number, it is refused when it
    names what the module does not define, or what a kept definition uses, or a top-level
    statement other than a function, a class or a literal, or code that rebinds names outside
    itself (`global`, `nonlocal`, `globals()`, `vars()`, `setattr`, `exec`, `sys.modules`, a
    write to an attribute or item of a module-level name: a best effort, as far as the syntax
    shows it; tests/test_verify.py checks the numbers themselves). A Python whose `ast.unparse`
    writes the same syntax otherwise gives another fingerprint: that costs a recomputation,
    never a stale result. `skip_listed=False` reads the whole module, its list ignored; a tuple
    names the lists to leave out together (e.g. the features' NOT_FINGERPRINTED and
    PAIR_CHECK_ONLY: `_SKIP_LISTS`), each held to the same refusals."""
    tree = ast.parse(text)
    lists = (FINGERPRINT_SKIP_LIST,) if skip_listed is True else tuple(skip_listed or ())
    skip: set[str] = set()
    for node in tree.body:
        target = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        name = next((t.id for t in target if isinstance(t, ast.Name) and t.id in lists), None)
        if name:
            try:
                listed = ast.literal_eval(node.value)
            except ValueError:
                listed = None
            if not (isinstance(listed, tuple) and all(isinstance(x, str) for x in listed)):
                raise ValueError(f"{name} must be a literal tuple of names (line {node.lineno})")
            skip |= set(listed) | {name}

    def names(node) -> set[str]:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            return {node.name}
        targets = node.targets if isinstance(node, ast.Assign) else (
            [node.target] if isinstance(node, ast.AnnAssign) else [])
        return {t.id for t in targets if isinstance(t, ast.Name)}

    def refused(msg: str, what) -> ValueError:
        return ValueError(f"{FINGERPRINT_SKIP_LIST} {msg}: {sorted(what)}")

    defined = set().union(*(names(node) for node in tree.body))
    if skip - defined:
        raise refused("names what the module does not define", skip - defined)
    skipped = [node for node in tree.body if names(node) and names(node) <= skip]
    kept = [node for node in tree.body if not (names(node) and names(node) <= skip)]
    # what a kept definition uses shapes its numbers, so it must be kept too
    used = {n.id for node in kept for n in ast.walk(node) if isinstance(n, ast.Name)} & skip
    if used:
        raise refused("leaves out what fingerprinted code uses", used)
    module_names = defined | {alias.asname or alias.name.split(".")[0] for node in tree.body
                              if isinstance(node, (ast.Import, ast.ImportFrom)) for alias in node.names}

    def base(target) -> str | None:  # the name an attribute or item written to hangs on
        while isinstance(target, (ast.Attribute, ast.Subscript, ast.Starred)):
            target = target.value
        return target.id if isinstance(target, ast.Name) else None

    for node in skipped:
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            try:
                ast.literal_eval(node.value)
            except ValueError:
                raise refused("leaves out a statement that is not a literal", names(node)) from None
        # (best effort: what left-out code writes outside itself, as far as the syntax shows it)
        writes = [t for n in ast.walk(node) if isinstance(n, (ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Delete))
                  for t in (n.targets if isinstance(n, (ast.Assign, ast.Delete)) else [n.target])]
        rebinds = ([n for n in ast.walk(node) if isinstance(n, (ast.Global, ast.Nonlocal))
                    or (isinstance(n, ast.Name) and n.id in ("globals", "vars", "setattr", "delattr", "exec"))
                    or (isinstance(n, ast.Attribute) and n.attr in ("__dict__", "modules"))]
                   + [t for t in writes if not isinstance(t, ast.Name) and base(t) in module_names])
        if rebinds:
            raise refused("leaves out code that rebinds names outside itself", names(node))
    tree.body = kept
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and body
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return tree


def code_fingerprint(kind: str) -> str:
    """The fingerprint of the code and library versions that make one kind of result (`_CODE`)."""
    from importlib import metadata
    files, dists = _CODE[kind]
    h = hashlib.sha256()
    here = Path(__file__).resolve().parent
    for name in files:
        text = (here / name).read_text()
        lists = False if name in _WHOLE.get(kind, ()) else _SKIP_LISTS.get(kind, {}).get(name, True)
        h.update(f"{name}={source_fingerprint(text, lists)}".encode())
    for dist in dists:
        try:
            h.update(f"{dist}={metadata.version(dist)}".encode())
        except metadata.PackageNotFoundError:
            h.update(f"{dist}=-".encode())
    return h.hexdigest()[:16]


def fingerprints(cfg: Config, weights_info: dict | None = None) -> dict[str, str]:
    """One fingerprint per kind of stored result, over the settings that shape it (and only
    those), the source of the modules that compute it and the versions of the libraries they use:
    a changed decide.* threshold invalidates nothing; verify.* the ORB results; embed.* the
    embeddings; screen hashing keys the hashes (and with them everything downstream)."""
    s, v, e = cfg.to_dict()["screen"], cfg.to_dict()["verify"], cfg.to_dict()["embed"]
    screen = {k: x for k, x in s.items() if k not in _SCREEN_SEARCH}
    screen["code"] = code_fingerprint("screen")
    orb_features = {k: x for k, x in v.items() if k not in _ORB_MATCH_ONLY | _NO_EFFECT}
    orb_features["decode_max_pixels"] = s["max_pixels"]
    orb_features["code"] = code_fingerprint("orb_features")
    embed = {k: x for k, x in e.items() if k not in _NO_EFFECT}
    embed["code"] = code_fingerprint("embed")
    embed.update(border_tolerance=s["border_tolerance"], trim_frames=s["trim_frames"],
                 decode_max_pixels=s["max_pixels"],
                 weights_sha256=(weights_info or {}).get("sha256"))
    out = {"screen": _fp(screen), "orb_features": _fp(orb_features), "embed": _fp(embed)}
    out["neighbours"] = _fp([out["screen"], {k: s[k] for k in sorted(_SCREEN_SEARCH)},
                             code_fingerprint("neighbours")])
    out["orb"] = _fp([out["orb_features"], {k: x for k, x in v.items() if k in _ORB_MATCH_ONLY},
                      code_fingerprint("orb_match"), code_fingerprint("orb_check")])
    return out


def content_ids(sha256) -> np.ndarray:
    """int64 content id per sha256 (its first 60 bits; * 8 + transform still fits in int64)."""
    values = pd.Series(sha256, dtype=object).to_numpy()
    return np.fromiter((int(h[:15], 16) for h in values), dtype=np.int64, count=len(values))


def check_content_ids(sha256) -> np.ndarray:
    uniq = pd.unique(pd.Series(sha256, dtype=object).dropna())
    ids = content_ids(uniq)
    if len(np.unique(ids)) != len(ids):  # 60-bit prefixes: astronomically unlikely
        raise RuntimeError("two different sha256 share their first 60 bits: refusing to mix their features")
    return content_ids(sha256)


def exists(location: Path | str) -> bool:
    """Is there a catalog (its manifest) at `location`?"""
    files = _Files(location)
    try:
        files.fs.invalidate_cache(files._path(MANIFEST))
        # (not fs.isfile, which answers False for every error: a refused key is not "no catalog")
        return files.fs.info(files._path(MANIFEST)).get("type", "file") != "directory"
    except (FileNotFoundError, NotADirectoryError):
        return False
    except Exception as exc:  # an unreachable store, no access: say what to fix
        if files.remote:
            raise storage.access_error(str(location), exc, "cannot read the catalog", "--catalog") from None
        raise


# ---------------------------------------------------------------------------------------------
# the catalog


def _empty(columns: list[str]) -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=object) for c in columns})


@dataclass
class Catalog:
    directory: Path | str  # a local folder, or a store URL
    manifest: dict = field(default_factory=dict)
    images: pd.DataFrame = field(default_factory=lambda: _empty(IMAGE_COLUMNS))
    neighbours: pd.DataFrame = field(default_factory=lambda: _empty(NEIGHBOUR_COLUMNS))
    evidence: pd.DataFrame = field(default_factory=lambda: _empty(EVIDENCE_COLUMNS))
    features: pd.DataFrame = field(default_factory=lambda: _empty(FEATURE_COLUMNS))
    problems: list[str] = field(default_factory=list)
    _checked: dict[str, bool] = field(default_factory=dict)
    # entity tags of stored files this run hashed and found right (`_checked_bytes`): the commit
    # adds them to parts listed without one, or with another (a copied catalog)
    tags: dict[str, str] = field(default_factory=dict)
    bad_files: set[str] = field(default_factory=set)  # failed their check: never listed again
    # rows of the feature parts this run counted (a footer read) or wrote (a compaction's): the
    # commit lists them in the parts' entries, so a later commit's compaction check reads no footer
    part_rows: dict[str, int] = field(default_factory=dict, repr=False, compare=False)
    files: _Files | None = None

    def __post_init__(self):
        if self.files is None:
            self.files = _Files(self.directory)

    # -- reading ------------------------------------------------------------------------------

    @classmethod
    def load(cls, directory: str | Path) -> "Catalog":
        """Read the manifest and its tables, each checked against its sha256. A missing catalog is
        an empty one; a corrupt table is reported (`problems`, a warning) and treated as empty."""
        directory = storage.local_form(directory)
        cat = cls(str(directory).rstrip("/") if storage.is_url(directory) else Path(directory))
        try:
            text = cat.files.read(MANIFEST)
        except FileNotFoundError:
            return cat
        except Exception as exc:
            if cat.files.remote:  # an unreachable store, no access: say what to fix
                raise storage.access_error(str(cat.directory), exc, "cannot read the catalog", "--catalog") from None
            if not isinstance(exc, OSError):
                raise
            cat._problem(f"{cat.files.full(MANIFEST)}: unreadable manifest ({exc}); the catalog is rebuilt from scratch")
            return cat
        try:
            manifest = json.loads(text.decode("utf-8"))
            if manifest.get("format") != FORMAT:
                raise ValueError(f"format {manifest.get('format')!r}, expected {FORMAT}")
        except (OSError, ValueError) as exc:
            cat._problem(f"{cat.files.full(MANIFEST)}: unreadable manifest ({exc}); the catalog is rebuilt from scratch")
            return cat
        cat.manifest = manifest
        for name, columns in TABLE_COLUMNS.items():
            entry = manifest.get("tables", {}).get(name)
            if not entry:
                continue
            data = cat._checked_bytes(entry["file"], entry)
            if data is None:
                continue
            try:
                frame = pq.read_table(io.BytesIO(data), read_dictionary=DICTIONARY_COLUMNS.get(name)).to_pandas()
            except Exception as exc:  # checked above; still, never trust a table that does not parse
                cat._problem(f"{entry['file']}: cannot be read ({exc}); rebuilt")
                continue
            for column in ADDED_COLUMNS.get(name, []):
                if column not in frame.columns:
                    frame[column] = None
            setattr(cat, name, frame[columns])
            del data, frame
        # the files' bytes and their Arrow tables are gone, their frames kept: give Arrow's freed
        # memory back (measured: the load's RSS 114 -> 86 MB for a 10k-file catalog)
        pa.default_memory_pool().release_unused()
        return cat

    def drop_tables(self, *names: str) -> None:
        """Forget tables as read at load that this run has no further use for (the files stay):
        a run holds each one only while a stage needs it."""
        for name in names:
            setattr(self, name, _empty(TABLE_COLUMNS[name]))

    def _problem(self, message: str) -> None:
        log.warning("catalog: %s", message)
        self.problems.append(message)

    def verify_file(self, rel: str, entry: dict | None = None) -> bool:
        """Is `rel` (relative to the catalog) present with the size and sha256 the manifest names?
        A part on a store whose entry lists the object's entity tag is checked by its size and
        tag instead (one HEAD, not a GET of ~11 MB: `_tag_checked`)."""
        if rel not in self._checked:
            entry = entry or self.manifest.get("parts", {}).get(rel)
            if self.files.remote and entry is not None and entry.get("etag"):
                self._tag_checked(rel, entry)
            else:
                self._checked_bytes(rel, entry)
        return self._checked[rel]

    def _tag_checked(self, rel: str, entry: dict) -> bool:
        """A stored part is the object the commit hashed when it is there with the same size and
        entity tag: a store gives an object written again (other bytes, or the same) a new tag,
        and keeps an object's bytes as written (its own checksums), so the tag stands for the
        sha256 the commit read. Another tag with the same size (a copy of the catalog, a
        metadata update) is settled by hashing the bytes. Not for local files (no such tag; a
        disk can rot)."""
        found = self.files.stat(rel)
        if found is not None and found[0] == entry["bytes"]:
            if found[1] == entry["etag"]:
                self._checked[rel] = True
                return True
            return self._checked_bytes(rel, entry) is not None  # another tag: the bytes decide
        self._problem(f"{rel}: missing; its records are recomputed" if found is None else
                      f"{rel}: not the size its catalog lists; its records are recomputed")
        self._checked[rel] = False
        self.bad_files.add(rel)
        return False

    def _checked_bytes(self, rel: str, entry: dict | None = None) -> bytes | None:
        """The bytes of `rel` when they are what the manifest names (size and sha256), else None
        (reported as a problem)."""
        entry = entry or self.manifest.get("parts", {}).get(rel)
        data = None
        # (a stored part's tag around the read; not a table's, which is always hashed)
        before = self.files.stat(rel) if self.files.remote and rel in self.manifest.get("parts", {}) else None
        if entry is None:
            self._problem(f"{rel}: not listed in the manifest; not used")
        elif (data := self.files.read_or_none(rel)) is None:
            self._problem(f"{rel}: missing; its records are recomputed")
        else:
            if len(data) != entry["bytes"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
                self._problem(f"{rel}: checksum mismatch (corrupt); its records are recomputed")
                data = None
        if data is not None and before is not None and before[1] and self.files.stat(rel) == before:
            self.tags[rel] = before[1]  # the hashed bytes' tag: the commit lists it (checked by it next time)
        self._checked[rel] = data is not None
        if data is None:
            self.bad_files.add(rel)
        return data

    @property
    def root(self) -> str | None:
        return self.manifest.get("root")

    def fingerprint(self, kind: str) -> str | None:
        return self.manifest.get("fingerprints", {}).get(kind)

    def feature_parts(self, kind: str, fp: str, sha256, transform, check: bool = True) -> tuple[pd.Series, dict]:
        """Stored features of `kind` made with settings `fp` for the wanted (sha256, transform):
        Series key (content_id * 8 + transform) -> absolute part path, only from parts whose
        checksum holds, in the order the wanted ones first appear. Also counts: how many were
        found ("reused"), and how many wanted ones are stored with other settings only.
        `check=False`: listed parts are taken unread, for a reader that checks each part it
        opens against `part_checks` (the report: reading every part here was ~2 GB at 100k).

        A stored failure whose cause may be gone (`tried_again`: a read, memory) is not reused
        but made again, counted as "failed_last_time"; any other failure is the bytes' own and
        is reused like a result.

        Matched on integer codes of the stored sha256 values (a transform is 0-7): a frame of the
        wanted texts, two per pair, copied each 64-character value into an Arrow column (+83 MB
        of the driver at the verify tier's start, 100k files, in a first run, which finds
        nothing). The paths share one string per part file."""
        rows = self.features[self.features["kind"] == kind]
        if not len(rows):  # nothing stored of this kind (a first run)
            return (pd.Series([], index=np.zeros(0, np.int64), dtype=object),
                    {"reused": 0, "settings_changed": 0, "failed_last_time": 0})
        row_codes, stored = pd.factorize(rows["sha256"])  # (the catalog's distinct contents)
        # (both sides object indexes: an array of strings given as is would become a `str` index,
        # copied into Arrow and back into a new Python string per row, +170 MB at 800k)
        at = pd.Index(np.asarray(stored, dtype=object), dtype=object).get_indexer(
            pd.Index(np.asarray(sha256, dtype=object), dtype=object))
        wanted = at >= 0  # (the others are not stored)
        keys, first = np.unique(at[wanted].astype(np.int64) * 8 + np.asarray(transform, dtype=np.int64)[wanted],
                                return_index=True)  # the wanted stored keys, each with its first place
        row_keys = np.where(row_codes >= 0, row_codes.astype(np.int64) * 8 + rows["transform"].to_numpy(np.int64), -1)
        is_wanted = np.isin(row_keys, keys)
        same = (rows["fp"] == fp).to_numpy(bool)
        failed = tried_again(rows["error"])
        take = np.flatnonzero(is_wanted & same & ~failed)
        take = take[np.argsort(first[np.searchsorted(keys, row_keys[take])], kind="stable")]  # first-seen order
        hit, hit_keys = rows[["key", "part"]].iloc[take], row_keys[take]
        if len(hit) and check:
            parts = {p: self.verify_file(p) for p in pd.unique(hit["part"])}
            good = hit["part"].map(parts).astype(bool).to_numpy()
            hit, hit_keys = hit[good], hit_keys[good]
        other = np.unique(row_keys[is_wanted & ~same])  # wanted, stored with other settings
        counts = {"reused": int(len(hit)), "settings_changed": int(len(other)) - int(np.isin(hit_keys, other).sum()),
                  "failed_last_time": int(len(np.unique(row_keys[is_wanted & same & failed])))}
        part_codes, part_names = pd.factorize(hit["part"])
        full = np.array([self.files.full(p) for p in part_names], dtype=object)
        series = pd.Series(full.take(part_codes), index=hit["key"].to_numpy(np.int64), dtype=object)
        return series, counts

    def part_checks(self, full_paths) -> list[str | None]:
        """"<bytes>:<sha256>" of each absolute part path as the manifest lists it, with
        ":<entity tag>" for a part on a store whose entry has one (then checked by its size and
        tag: `verify_file`): what `store.read_columns` checks a part against before it uses it.
        None for a file it does not list (e.g. a part this run made) and for one this catalog has
        already checked and found right (`verify_file`: the verify tier's; parts never change in
        place, so once is enough)."""
        listed = self.manifest.get("parts", {})
        out = []
        for path in full_paths:
            try:
                rel = self.files.rel(path)
            except ValueError:  # (not under the catalog)
                rel = None
            entry = None if rel is None or self._checked.get(rel) else listed.get(rel)
            tag = f":{entry['etag']}" if entry and self.files.remote and entry.get("etag") else ""
            out.append(f"{entry['bytes']}:{entry['sha256']}{tag}" if entry else None)
        return out

    def orphan_parts(self, kind: str, fp: str, sha_of_cid: pd.Series) -> pd.DataFrame:
        """Feature parts a killed run finished (complete files: the store writes each part to a
        temporary name and renames it, or as one PUT) but never listed: key, part_path, error of
        the rows whose content is still present and whose key the catalog does not list already,
        to be adopted instead of recomputed. (Unlisted parts also hold what the catalog lists
        elsewhere: the parts a compaction replaced, and those a run wrote that its own compaction
        took in, stay on disk a generation. Adopted, their rows took the place of the compacted
        ones, the next commit listed the old parts again and compacted again: every night, each
        keeping its old parts too, until a night with nothing to verify. Rows of settings the
        catalog forgot, e.g. before a setting changed and back, are still adopted.)"""
        listed = set(self.manifest.get("parts", {}))
        frames = []
        for rel in self.files.find(f"features/{kind}/{fp}", "part-"):
            if rel in listed or not rel.endswith(".parquet"):
                continue
            try:
                table = self.files.table(rel, columns=["key", "error"]).to_pandas()
            except Exception:  # not a whole Parquet file: garbage, removed at the next commit
                continue
            table["part_path"] = self.files.full(rel)
            frames.append(table)
        if not frames:
            return pd.DataFrame({"key": np.zeros(0, np.int64), "part_path": pd.Series(dtype=object),
                                 "error": pd.Series(dtype=object)})
        found = pd.concat(frames, ignore_index=True)
        found = found[pd.Index(found["key"] // 8).isin(sha_of_cid.index) & ~tried_again(found["error"])]  # (as feature_parts)
        # (the listed rows with an orphan's key first: a hash of the orphans' keys, not of every
        # listed one, ~10M; then only those checked for kind, settings, a failure to try again
        # and a part that failed its check, whose keys a run makes again and may have left here)
        rows = self.features
        same_key = rows.iloc[np.flatnonzero(rows["key"].isin(found["key"].to_numpy(np.int64)).to_numpy(bool))]
        listed_ok = ((same_key["kind"] == kind) & (same_key["fp"] == fp)
                     & ~same_key["part"].isin(self.bad_files)).to_numpy(bool, copy=True)
        listed_ok[listed_ok] = ~tried_again(same_key["error"][listed_ok])
        found = found[~found["key"].isin(same_key["key"].to_numpy(np.int64)[listed_ok])]
        return found.drop_duplicates("key", keep="last").reset_index(drop=True)

    def failed(self, kind: str, fp: str | None) -> pd.DataFrame:
        """sha256 and key (content id * 8 + transform) of the stored features of `kind` made with
        settings `fp` (None: any settings) that failed for a cause that may be gone
        (`tried_again`): `feature_parts` makes them again, and what was scored from them is scored
        again (`without_failed_scores`)."""
        rows = self.features
        bad = ((rows["kind"] == kind) & ((rows["fp"] == fp) if fp is not None else True)).to_numpy(bool, copy=True)
        bad[bad] = tried_again(rows["error"][bad])
        # (the failed rows' texts only: the whole column as objects is a Python string per row)
        return pd.DataFrame({"sha256": rows["sha256"][bad].to_numpy(dtype=object),
                             "key": rows["key"][bad].to_numpy(np.int64)})

    def feature_root_folder(self) -> str:
        """The folder (or prefix) under which every feature part is."""
        return self.files.full("features")

    def feature_root(self, kind: str, fp: str) -> str:
        """Where features of `kind` made with settings `fp` go (verify adds a folder per run)."""
        return self.files.full(f"features/{kind}/{fp}")

    def feature_dir(self, kind: str, fp: str, run_id: str) -> str:
        return self.files.full(f"features/{kind}/{fp}/{run_id}")

    # -- writing (the caller holds the lock) --------------------------------------------------

    def commit(self, *, root: str, run_id: str, fps: dict, images: pd.DataFrame,
               neighbours: pd.DataFrame | NeighbourTable | None,
               evidence: pd.DataFrame | EvidenceTable, features: pd.DataFrame, config: dict | None = None,
               written: dict | None = None) -> dict:
        """Write the new tables, then switch the manifest atomically; remove files no manifest of
        this or the previous generation names. Returns the new manifest.

        `written`: the parts the workers wrote, with their writers' sizes and digests
        (`store.written_anywhere`); with those this process's own (a compaction's), a new part
        whose state is still the writer's is listed without reading it again."""
        previous = self.manifest
        generation = int(previous.get("generation", 0)) + 1
        tag = f"{generation:06d}-{uuid.uuid4().hex[:8]}"
        tables = {}
        fingerprints_ = dict(previous.get("fingerprints", {}))
        fingerprints_.update(fps)
        if neighbours is None:  # this run did not search (nothing to keep)
            neighbours = _empty(NEIGHBOUR_COLUMNS)
        # parts this run wrote (or adopted): a compaction may leave them unnamed, yet this run's
        # report still reads its thumbnails and keypoints from them after the commit
        this_runs = set(pd.unique(features["part"].astype(str))) - set(previous.get("parts", {})) \
            if len(features) else set()
        features, compacted = self.compact(features, tag)
        for name, frame in (("images", images), ("neighbours", neighbours), ("evidence", evidence),
                            ("features", features)):
            tables[name] = self.files.write_table(f"tables/{name}-{tag}.parquet", frame)
        old_parts = previous.get("parts", {})
        named = sorted(pd.unique(features["part"].astype(str))) if len(features) else []
        new_parts = [rel for rel in named if not old_parts.get(rel)]
        by_writer = {}
        for path, found in {**(written or {}), **store.written(self.feature_root_folder())}.items():
            with contextlib.suppress(ValueError):  # (a path outside the catalog)
                by_writer[self.files.rel(path)] = found
        # each new part's size and sha256: its writer's, when the part is still as written (one
        # HEAD or stat), else read once, ENTRY_READERS at a time (on a store ~11 MB each: one
        # after another they added up, ~180 parts at 100k files)
        with ThreadPoolExecutor(max_workers=max(1, min(ENTRY_READERS, len(new_parts)))) as pool:
            made = dict(zip(new_parts, pool.map(lambda rel: _entry(self.files, rel, by_writer.get(rel)), new_parts)))
        parts = {rel: old_parts.get(rel) or made[rel] for rel in named}
        for rel in set(parts) & set(self.part_rows):  # (rows counted or written by this run)
            if parts[rel].get("rows") != self.part_rows[rel]:
                parts[rel] = {**parts[rel], "rows": self.part_rows[rel]}
        for rel in set(parts) & set(self.tags):
            if parts[rel].get("etag") != self.tags[rel]:
                parts[rel] = {**parts[rel], "etag": self.tags[rel]}
        if config and config.get("storage", {}).get("options"):  # never credentials in the catalog
            config = {**config, "storage": {**config["storage"],
                                            "options": storage.redacted(config["storage"]["options"])}}
        manifest = {"format": FORMAT, "generation": generation, "run_id": run_id, "root": root,
                    "updated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "fingerprints": fingerprints_, "config": config or previous.get("config"),
                    "tables": tables, "parts": parts,
                    "counts": {"images": int(len(images)), "pairs_with_evidence": int(len(evidence)),
                               "features": int(len(features))}, "compacted": compacted}
        # the commit point: every file it names is written
        self.files.write(MANIFEST, json.dumps(manifest, indent=1).encode("utf-8"), durable=True)
        self.manifest = manifest
        self.collect_garbage(keep=[previous, manifest], spare=this_runs)  # (those go with the next commit's)
        return manifest

    def compact(self, features: pd.DataFrame, tag: str) -> tuple[pd.DataFrame, list[dict]]:
        """Rewrite the referenced rows of each (kind, fp) whose small parts are too many or whose
        parts are mostly dead (COMPACT_MAX_PARTS, COMPACT_DEAD_FRACTION) into new parts of
        COMPACT_ROWS_PER_PART rows, reading one old part at a time. Returns the features table
        pointing at the new parts and what was compacted. The old parts stay until garbage
        collection (two generations later)."""
        done = []
        if not len(features):
            return features, done
        features = features.copy()
        for (kind, fp), group in features.groupby(["kind", "fp"], sort=True):
            parts = sorted(pd.unique(group["part"].astype(str)))
            sizes = [self._rows_in_part(p) for p in parts]
            stored = sum(sizes)
            small = sum(size < COMPACT_ROWS_PER_PART // 2 for size in sizes)
            if small <= COMPACT_MAX_PARTS and len(group) >= stored * (1 - COMPACT_DEAD_FRACTION):
                continue
            out_dir = self.feature_dir(kind, fp, f"compact-{tag}")
            # each part's rows found once (a scan of the group per part was O(rows x parts));
            # the keys written, an array per new part (not a dict entry per key)
            rows_of = group.groupby(group["part"].astype(str), sort=True).indices
            new_keys: list[np.ndarray] = []
            new_paths: list[str] = []
            corrupt: list[np.ndarray] = []
            buffer: list[pa.Table] = []

            def flush() -> None:  # (a part whose error column is all null has type null: promote)
                merged = pa.concat_tables(buffer, promote_options="default").sort_by("key")
                buffer.clear()
                if merged.num_rows:
                    path = store.write_partition(out_dir, len(new_paths), merged)
                    new_keys.append(merged["key"].to_numpy())
                    new_paths.append(self.files.rel(path))
                    self.part_rows[new_paths[-1]] = merged.num_rows

            for part in parts:
                rows = group.iloc[rows_of[part]]
                listed = part in self.manifest.get("parts", {})  # else written by this run
                if listed and not self.verify_file(part):  # corrupt: its features are recomputed later
                    corrupt.append(rows.index.to_numpy())
                    continue
                table = self.files.table(part)
                buffer.append(table.filter(pc.is_in(table["key"], value_set=pa.array(rows["key"].to_numpy(np.int64)))))
                if sum(t.num_rows for t in buffer) >= COMPACT_ROWS_PER_PART:
                    flush()
            if buffer:
                flush()
            if corrupt:
                features = features.drop(index=np.concatenate(corrupt))
            # each key's new part: the last written that holds it
            keys = np.concatenate(new_keys) if new_keys else np.zeros(0, np.int64)
            part_of_key = pd.Series(np.repeat(np.arange(len(new_paths)), [len(k) for k in new_keys]), index=keys)
            part_of_key = part_of_key[~part_of_key.index.duplicated(keep="last")]
            mine = features.index[(features["kind"] == kind) & (features["fp"] == fp)]
            at = part_of_key.reindex(features.loc[mine, "key"].to_numpy(np.int64)).fillna(-1).to_numpy(np.int64)
            features.loc[mine, "part"] = np.append(np.asarray(new_paths, dtype=object), None)[at]  # (-1: None)
            features = features[features["part"].notna()]  # rows whose part did not hold their key
            mine = features.index[(features["kind"] == kind) & (features["fp"] == fp)]
            written = len(new_paths)
            kept = len(mine)
            done.append({"kind": kind, "fp": fp, "parts_before": len(parts), "rows_stored_before": int(stored),
                         "rows_kept": int(kept), "parts_after": written})
            log.info("catalog: compacted %s features (%d parts, %d rows -> %d parts, %d rows)", kind,
                     len(parts), stored, written, kept)
        return features, done

    def _rows_in_part(self, rel: str) -> int:
        """A feature part's rows: as its manifest entry lists them, else from its footer (a part
        this run wrote, or one listed by a commit that did not record rows), counted for the
        commit to list (`part_rows`). A footer read per part and commit was a request per part
        on a store (~16k parts at 10M images, one after another). A listed part's count is
        recorded only when the file still has the listed size (a replaced file's rows are not
        listed beside the original's sha256); 0: unreadable (compaction then checks it; a listed
        part that vanished keeps its listed count, and is found when its features are read)."""
        entry = self.manifest.get("parts", {}).get(rel)
        rows = (entry or {}).get("rows")
        if rows is None:
            rows = self.part_rows.get(rel)
        if rows is None:
            rows = self.files.num_rows(rel)
            if rows and (entry is None or (self.files.stat(rel) or (None,))[0] == entry.get("bytes")):
                self.part_rows[rel] = rows
        return int(rows)

    def collect_garbage(self, keep: list[dict], spare: set[str] = frozenset()) -> list[str]:
        """Remove files under tables/ and features/ that none of the `keep` manifests names (left by
        killed runs, or superseded two generations ago), except those in `spare`."""
        named = {MANIFEST, *spare}
        for m in keep:
            named |= {e["file"] for e in m.get("tables", {}).values()}
            named |= set(m.get("parts", {}))
        removed = []
        for sub in ("tables", "features"):
            for rel in self.files.find(sub):
                if rel not in named:
                    self.files.remove(rel)
                    removed.append(rel)
            self.files.remove_empty_folders(sub)
        if not self.files.remote:  # a manifest's temporary name left by a killed run
            for path in Path(self.directory).glob(f".{MANIFEST}.*.tmp"):
                path.unlink(missing_ok=True)
        if removed:
            log.info("catalog: removed %d file(s) no longer referenced", len(removed))
        return removed


def _entry(files: _Files, rel: str, by_writer: tuple[int, str, str] | None = None) -> dict:
    """A part's manifest entry: its size and sha256, and on a store its entity tag (later runs
    check the part by its size and tag, `Catalog.verify_file`). `by_writer`: (bytes, sha256,
    state) from the part's writer (`store.written`); when the part's state now is the one its
    writer saw, the entry is made from them, else the part is read (`_hashed_entry`)."""
    if by_writer is not None:
        size, digest, was = by_writer
        with contextlib.suppress(Exception):  # (a failed HEAD or stat: the part is read instead)
            if store.state(files.full(rel)) == (size, was):
                return {"file": rel, "bytes": size, "sha256": digest, **({"etag": was} if files.remote else {})}
    return _hashed_entry(files, rel)


def _hashed_entry(files: _Files, rel: str) -> dict:
    """A file's manifest entry, read a MiB at a time (a feature part is ~13 MB: read whole, each
    one a transient step in the commit's peak). On a store also the object's entity tag, when it
    gives one and it is the same before and after the read (so the tag is of the bytes hashed)."""
    before = files.stat(rel) if files.remote else None
    digest, size = hashlib.sha256(), 0
    # (4 MiB blocks, a GET each on a store: its file object would otherwise read ahead ~50 MB,
    # the whole part, for each of the ENTRY_READERS at once)
    with files.fs.open(files._path(rel), "rb", block_size=4 << 20) as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
            size += len(block)
    entry = {"file": rel, "bytes": size, "sha256": digest.hexdigest()}
    if before is not None and before[1] and files.stat(rel) == before == (size, before[1]):
        entry["etag"] = before[1]
    return entry


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def check_not_foreign(directory: Path) -> None:
    """ConfigError for a local folder that holds files but that no catalog was ever opened in
    (no manifest, no lock file), e.g. the user's own OUT/catalog: a commit removes every file
    under its tables/ and features/ that no manifest names."""
    directory = Path(directory)
    try:
        foreign = (directory.is_dir() and not (directory / MANIFEST).exists()
                   and not os.path.lexists(directory / LOCK_NAME) and any(directory.iterdir()))
    except OSError:  # (one that cannot be read: opening it says so)
        return
    if foreign:
        raise ConfigError(f"the catalog folder {str(directory)!r} holds files but no catalog: choose another folder "
                          "for it (--catalog DIR, or catalog: in the config), or --no-catalog (nothing was changed)")


@contextlib.contextmanager
def opened(directory: str | Path) -> Iterator[Catalog]:
    """Hold the catalog's lock (a second run exits 2 naming the holder) and load it."""
    directory = storage.local_form(directory)
    if storage.is_url(directory):
        directory = str(directory).rstrip("/")
        lock = storage.locked(directory, name=LOCK_NAME, what="catalog", option="--catalog")
    else:
        directory = Path(directory)
        if directory.exists() and not directory.is_dir():
            raise ConfigError(f"catalog path {str(directory)!r} exists and is not a folder: choose another --catalog")
        check_not_foreign(directory)
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create the catalog folder {str(directory)!r} ({exc.strerror}): "
                              "choose another --catalog") from None
        lock = outdir.locked(directory, name=LOCK_NAME, what="catalog", option="--catalog")
    with lock:
        files = _Files(directory)
        before = _written(files)
        try:
            yield Catalog.load(directory)
        except BaseException:  # a failed or stopped run: remove what it wrote that no manifest names
            named: set[str] = set()
            with contextlib.suppress(OSError, ValueError):  # stopped after its commit: keep that
                current = json.loads(files.read(MANIFEST).decode("utf-8"))
                named = {e["file"] for e in current.get("tables", {}).values()} | set(current.get("parts", {}))
            with contextlib.suppress(OSError):  # best effort: the next commit removes the rest
                for rel in sorted(_written(files) - before - named):
                    files.remove(rel)
            raise


def _written(files: _Files) -> set[str]:
    return set(files.find("tables")) | set(files.find("features"))


# ---------------------------------------------------------------------------------------------
# what a run takes from the catalog, and what it gives back


class KnownImages:
    """The catalog's per-image records of this run's folder, matched a batch of paths at a time:
    arrays over the catalog's images table (no Python dict per image: a nightly run over an
    unchanged folder matches every file here)."""

    def __init__(self, images: pd.DataFrame, screen_fp: str | None):
        if images["path"].duplicated(keep="last").any():  # (a catalog holds one row per path)
            images = images.drop_duplicates("path", keep="last")
        self.images = images = images.reset_index(drop=True)
        # (object, said so: pandas would infer Arrow text, whose index answers a look-up with
        # objects by making every record's path a Python string and a hash table again, each
        # call: ~137 ms per 4,096 paths at 1M records, a call per screen batch; 5 ms this way)
        self._index = pd.Index(images["path"].to_numpy(dtype=object), dtype=object)
        self.bytes = images["bytes"].to_numpy(np.int64)
        self.mtime_ns = images["mtime_ns"].to_numpy(np.int64)
        self.sha256 = images["sha256"].to_numpy(dtype=object)
        self.etag = images["etag"].to_numpy(dtype=object)
        # made with other screen settings (or code): to be screened again
        self.stale = (images["screen_fp"] != screen_fp).to_numpy(bool)
        self.clean = images["error"].isna().to_numpy(bool)
        self.retry = tried_again(images["error"], screen=True)  # (failed for a cause that may be gone: read again)

    def __len__(self) -> int:
        return len(self.images)

    def find(self, paths: list[str]) -> np.ndarray:
        """Row of each path's record (text form), -1 where the catalog has none."""
        if not len(self.images) or not len(paths):
            return np.full(len(paths), -1, np.int64)
        return self._index.get_indexer(pd.Index(paths, dtype=object))

    def images_as_they_were(self, rels: list[str], sizes: np.ndarray, mtime_ns: np.ndarray) -> np.ndarray:
        """True for each listed file (names relative to the folder, as listed; sizes; mtime_ns)
        whose record says it is an image as it is: no error, made with these screen settings,
        the same size and mtime_ns (`scan.iter_files` does not read its first bytes again)."""
        at = self.find([paths.text_form(r) for r in rels])
        ok = at >= 0
        a = at[ok]
        ok[ok] = ~self.stale[a] & self.clean[a] & (self.bytes[a] == sizes[ok]) & (self.mtime_ns[a] == mtime_ns[ok])
        return ok

    def rows(self, at: np.ndarray, columns: list[str]) -> pd.DataFrame:
        """Those columns of the records at rows `at`."""
        return self.images[columns].take(np.asarray(at, np.int64)).reset_index(drop=True)


def known_records(cat: Catalog | None, fps: dict, root: str, reuse: dict) -> KnownImages | None:
    """The catalog's records of this folder (KnownImages; empty when the catalog was made for
    another folder); None without a catalog."""
    if cat is None:
        return None
    if cat.root is not None and _root_key(cat.root) != _root_key(root):
        reuse["not_reused"] = f"the catalog was made for another folder ({cat.root})"
        log.warning("the catalog at %s was made for another folder (%s): this run reads every file of %s "
                    "and the catalog then holds this folder's records only (keep one OUT, or one --catalog, "
                    "per DATA)", cat.directory, cat.root, root)
        return KnownImages(_empty(IMAGE_COLUMNS), fps["screen"])
    return KnownImages(cat.images, fps["screen"])


def _root_key(root: str) -> str:
    """A URL with or without its trailing "/" names the same prefix."""
    return root.rstrip("/") if storage.is_url(root) else root


def previous_lists(cat: Catalog | None, images: pd.DataFrame, representative: np.ndarray, fps: dict,
                   reuse: dict) -> tuple[pd.DataFrame, np.ndarray] | None:
    """The last run's K-nearest lists in current row numbers (-1 for images gone or changed) and
    `same` (N,): images that took part last time with the same content and hashes."""
    if cat is None:
        return None
    if cat.fingerprint("neighbours") != fps["neighbours"] or not len(cat.images):
        reuse["searched_all_because"] = ("no previous lists" if cat.fingerprint("neighbours") is None
                                         else "screen or search settings, or the search code, changed")
        return None
    old = cat.images
    old = old[old["screen_fp"] == fps["screen"]].sort_values("path", kind="stable").reset_index(drop=True)
    old_valid = old["error"].isna() & old["codes"].notna()
    from pipeline.candidates import exact_representatives
    old_rep = old_valid.to_numpy() & exact_representatives(old["sha256"])
    old_sha = pd.Series(old["sha256"].to_numpy()[old_rep], index=old["path"].to_numpy()[old_rep])
    paths = images["path"].to_numpy()
    sha_then = old_sha.reindex(paths).to_numpy(dtype=object)
    same = representative & (sha_then == images["sha256"].to_numpy(dtype=object))
    row_of = pd.Series(np.where(same, np.arange(len(images)), -1), index=paths)
    nb = cat.neighbours
    directed = pd.DataFrame({"owner_a": _rows_of_paths(nb["owner"], row_of),
                             "owner_b": _rows_of_paths(nb["neighbour"], row_of),
                             "hash_distance": nb["hash_distance"].to_numpy(np.int16)})
    return directed, same


def _rows_of_paths(column: pd.Series, row_of: pd.Series) -> np.ndarray:
    """row_of[path] for each path of `column` (-1 where absent), through its distinct values (the
    table's column is a categorical: DICTIONARY_COLUMNS; no Python string per row)."""
    codes, distinct = pd.factorize(column)
    found = row_of.reindex(np.asarray(distinct, dtype=object)).fillna(-1).to_numpy(np.int64)
    return np.append(found, -1).take(codes)  # (a missing path, code -1, takes the last: -1)


def neighbours_table(directed, images: pd.DataFrame) -> "NeighbourTable | None":
    """Each image's nearest, by path, made a row group at a time as the table is written
    (`NeighbourTable`). `directed`: the lists as a frame, or written by the workers
    (`candidates.SavedLists`); None: no lists (the commit writes an empty table)."""
    if directed is None:
        return None
    return NeighbourTable(directed, images)


def _neighbour_rows(directed: pd.DataFrame, images: pd.DataFrame) -> pd.DataFrame:
    """Lists rows (owner_a, owner_b, hash_distance) as the table's rows: object columns of the
    paths at those rows only. The images' path column is Arrow text in a run (pandas 3): taken
    whole into Python strings it made one per image, for every row group (at 10M images ~0.7 s
    and ~0.6 GB a group, thousands of groups); taken at the group's rows, one per row."""
    path = images["path"]

    def at(rows: np.ndarray) -> np.ndarray:
        if path.dtype == object:  # (its own strings: no copy)
            return path.to_numpy()[rows]
        return np.asarray(path.array.take(rows), dtype=object)
    return pd.DataFrame({"owner": pd.Series(at(directed["owner_a"].to_numpy(np.int64)), dtype=object),
                         "neighbour": pd.Series(at(directed["owner_b"].to_numpy(np.int64)), dtype=object),
                         "hash_distance": directed["hash_distance"].to_numpy(np.int16)})


class NeighbourTable:
    """The neighbours table made as it is written: the lists, a frame or read back a partition
    at a time (`lists.frames()`, e.g. `candidates.SavedLists`; with no rows at all,
    `lists.gather()`, the empty lists frame), cut into TABLE_ROWS_PER_GROUP rows (the same rows
    in the same order), each group's image numbers turned into paths (`_neighbour_rows`) only as
    it is written: the driver holds one partition's lists and one group, not every image's K
    nearest as paths (~34 B a row; the lists as numbers are 18 B)."""

    def __init__(self, lists, images: pd.DataFrame):
        self.lists, self.images = lists, images

    def __len__(self) -> int:
        return len(self.lists)

    def parts(self) -> Iterator[pd.DataFrame]:
        """The table in row order, TABLE_ROWS_PER_GROUP rows at a time (one empty part if none)."""
        held: list[pd.DataFrame] = []  # read and not yet written, the first from row `start`
        start = n_held = 0
        made = False
        lists = [self.lists] if isinstance(self.lists, pd.DataFrame) else self.lists.frames()
        for rows in itertools.chain(lists, [None]):
            if rows is not None and len(rows):
                held.append(rows)
                n_held += len(rows)
            while n_held >= TABLE_ROWS_PER_GROUP or (rows is None and n_held):
                pieces, need = [], min(TABLE_ROWS_PER_GROUP, n_held)
                n_held -= need
                while need:
                    left = len(held[0]) - start
                    pieces.append(held[0].iloc[start:start + min(need, left)])
                    if left <= need:
                        held.pop(0)
                        start, need = 0, need - left
                    else:
                        start, need = start + need, 0
                yield _neighbour_rows(pd.concat(pieces, ignore_index=True), self.images)
                made = True
        if not made:  # (no rows: the lists' own empty frame; the writer types its empty paths as text)
            empty = self.lists if isinstance(self.lists, pd.DataFrame) else self.lists.gather()
            yield _neighbour_rows(empty, self.images)

    def frame(self) -> pd.DataFrame:
        """The whole table at once (small tables: tests; the commit writes `parts`)."""
        return pd.concat(list(self.parts()), ignore_index=True)


def images_table(images: pd.DataFrame, fps: dict) -> pd.DataFrame:
    out = images[[c for c in IMAGE_COLUMNS if c != "screen_fp"]].copy(deep=False)  # (new columns only)
    out["screen_fp"] = fps["screen"]
    return out.astype({"bytes": "int64", "mtime_ns": "int64", "width": "Int64", "height": "Int64",
                       "variant_mask": "int64"})


def _pair_keys(*pairs: tuple) -> list[pd.Index]:
    """Pairs of contents (sha_a, sha_b, transform), several sets of them, as indexes to match on:
    each sha256 replaced by one integer per distinct value over all the sets (exact), a missing
    one by its own. Each column is factorized on its own (an Arrow or categorical column by its
    dictionary, an object column on the strings it shares with the images) and only the distinct
    values are matched across columns: converting every row's text to one column first cost ~0.5
    kB per pair, the largest item of a re-run's driver peak at 10k files. A pair is then one
    int64, (a * n + b) * 16 + transform (the evidence's keys reach 15: `verify.evidence_transforms`),
    while n * n * 16 fits (n: distinct contents, + 1 for missing), else a MultiIndex of the three."""
    sides = [side for sha_a, sha_b, _ in pairs for side in (sha_a, sha_b)]
    local = [pd.factorize(side if isinstance(side, pd.Series) else pd.Series(np.asarray(side, dtype=object),
                                                                             dtype=object))
             for side in sides]
    distinct = [np.asarray(uniques, dtype=object) for _, uniques in local]  # (at most one per content)
    index = pd.Index(pd.unique(np.concatenate(distinct)) if distinct else np.zeros(0, object), dtype=object)
    n = len(index) + 1  # (code n - 1: a missing sha256)
    codes = []
    for i in range(len(local)):
        at = local[i][0]
        local[i] = None  # (each side's own codes go as its common ones are made)
        common = np.append(index.get_indexer(distinct[i]), n - 1)  # (at = -1, missing, takes the last)
        codes.append(common.take(at))
    transforms = [np.asarray(t, dtype=np.int64) for _, _, t in pairs]
    if n * n < 2 ** 58 and all(((t >= 0) & (t < 16)).all() for t in transforms):
        out = []
        for i, t in enumerate(transforms):
            key = codes[2 * i] * n
            key += codes[2 * i + 1]
            key *= 16
            key += t
            codes[2 * i] = codes[2 * i + 1] = None
            out.append(pd.Index(key, dtype=np.int64))
        return out
    return [pd.MultiIndex.from_arrays([codes[2 * i], codes[2 * i + 1], t]) for i, t in enumerate(transforms)]


# Stored failures whose cause may be gone with the bytes unchanged: a read (I/O, permissions, a
# file gone for a moment), memory, or a limit in no fingerprint (scan.max_file_bytes; the decode
# budget, screen.max_decode_bytes, for the tiers). They are tried again at the next run; any other
# failure (a corrupt or unsupported file, an image ORB finds nothing in) is the bytes' own under the
# fingerprinted code and settings, and is kept like a result. A result made under a higher decode
# budget is kept when the budget is lowered: the budget bounds memory, not what a result means (a
# fresh run with the lower budget calls that pair's image "too large to decode"; the re-run keeps
# its scores). A file that changed during the run (decide.CHANGED_ERROR) is read again too. (The
# texts: scan.py, screen.py, decode.py, verify.py, confirm.py, decide.py; tests/test_catalog.py
# checks that each one is still made there.)
TRIED_AGAIN = ("cannot read", "permission denied", "file disappeared", "cannot open", "file too large",
               "image too large to decode", "changed during the run")
# ... except by the screen, which reads a file's bytes before it decodes them from memory (so its
# "cannot open" is the bytes' own, a corrupt header) and whose fingerprint holds the decode budget
SCREEN_KEEPS = ("cannot open", "image too large to decode")


def tried_again(errors, screen: bool = False) -> np.ndarray:
    """bool per error text (None: no failure): a failure to try again (TRIED_AGAIN, or memory;
    `screen`: a screen record's, SCREEN_KEEPS kept)."""
    codes, distinct = pd.factorize(pd.Series(errors).reset_index(drop=True))  # (a few distinct texts)
    again = np.array([(str(e).startswith(TRIED_AGAIN) and not (screen and str(e).startswith(SCREEN_KEEPS)))
                      or "MemoryError" in str(e) for e in distinct] + [False])
    return again[codes]


def without_failed_scores(evidence: pd.DataFrame, failed: dict, pair_keys: dict) -> pd.DataFrame:
    """The evidence without the scores made from features that failed for a cause that may be gone
    (`failed`: kind "orb" / "embed" -> `Catalog.failed`; `pair_keys`: kind -> the feature keys a
    pair (content ids a and b, transform) is scored with, `verify.pair_feature_keys`,
    `confirm.pair_embedding_keys`): such a pair is scored again when it is next a candidate, its
    features made again, where its stored failure (an inconclusive pair, a NaN cosine) was kept
    as long as the bytes were, even past the features' own retry. A row whose ORB features
    failed goes; one whose embedding failed loses its cosine only. Only the rows of the failed
    contents are looked at."""
    frames = [f for f in failed.values() if len(f)]
    if not len(evidence) or not frames:
        return evidence
    contents = pd.unique(pd.concat(frames)["sha256"].to_numpy(dtype=object))
    suspect = np.flatnonzero(among(evidence["sha_a"], contents) | among(evidence["sha_b"], contents))
    if not len(suspect):
        return evidence
    rows = evidence.iloc[suspect]
    ca = content_ids(rows["sha_a"].astype(object))
    cb = content_ids(rows["sha_b"].astype(object))
    t = rows["transform"].to_numpy(np.int64)
    bad = {}
    for kind, frame in failed.items():
        bad[kind] = np.zeros(len(rows), bool)
        if len(frame):
            for k in pair_keys[kind](ca, cb, t):
                bad[kind] |= np.isin(k, frame["key"].to_numpy(np.int64))
    if not any(b.any() for b in bad.values()):
        return evidence
    evidence = evidence.copy()
    if "embed" in bad and bad["embed"].any():  # (a row's ORB numbers stay when only its cosine failed)
        at = evidence.index[suspect[bad["embed"]]]
        evidence.loc[at, "cosine"] = pd.NA
        evidence.loc[at, "embed_fp"] = None
    return evidence.drop(evidence.index[suspect[bad["orb"]]]) if "orb" in bad else evidence


def lookup_evidence(cat: Catalog | None, sha_a, sha_b, transform, what: str, fp: str) -> tuple[np.ndarray, pd.DataFrame]:
    """Stored evidence for pairs of contents: (hit mask, frame of the columns of the hits, one row
    per hit in order), `what` = "orb" (ORB_COLUMNS, made with settings `fp`) or "cosine";
    "orb_any"/"cosine_any": made with any settings. Rows only for the hits: a first run asks
    about every pair and finds none. (Scores made from features that failed for a cause that may
    be gone are dropped before: `without_failed_scores`.)"""
    n = len(sha_a)
    columns = ORB_COLUMNS if what.startswith("orb") else ["cosine"]
    if cat is None or not len(cat.evidence):
        return np.zeros(n, bool), pd.DataFrame(columns=columns)
    ev = cat.evidence
    fp_col = "orb_fp" if what.startswith("orb") else "embed_fp"
    keep = (ev[fp_col].notna() if what.endswith("_any") else ev[fp_col] == fp).to_numpy(bool)
    # only rows of the contents asked about (a query asks about a few of 100k+ rows), and only the
    # columns asked for (one copy of those rows)
    keep = (keep & ev["sha_a"].isin(pd.unique(np.asarray(sha_a, dtype=object))).to_numpy(bool)
            & ev["sha_b"].isin(pd.unique(np.asarray(sha_b, dtype=object))).to_numpy(bool))
    ev = ev.loc[keep, ["sha_a", "sha_b", "transform", *columns]]
    stored, asked = _pair_keys((ev["sha_a"], ev["sha_b"], ev["transform"]), (sha_a, sha_b, transform))
    last = ~stored.duplicated(keep="last")  # one row per pair: the last
    at = stored[last].get_indexer(asked) if n and last.any() else np.full(n, -1, np.int64)
    found = ev.loc[last, columns].reset_index(drop=True).take(at[at >= 0]).reset_index(drop=True)
    for column in found.columns:  # the texts as objects sharing one string per distinct value: a
        if isinstance(found[column].dtype, pd.CategoricalDtype):  # categorical's own conversion makes
            found[column] = pd.Series(store.shared_text(found[column]), dtype=object)  # one per row (~55 MB at 100k)
    return at >= 0, found


_EVIDENCE_NUMBERS = {"orb_matches": "Int32", "orb_inliers": "Int32", "orb_score": "Float32", "ssim": "Float32",
                     "hist_corr": "Float32", "cosine": "Float32"}


def _evidence_values(column: str, values) -> np.ndarray | pd.api.extensions.ExtensionArray:
    """One evidence column as the table stores it: transform int8, numbers nullable, text objects
    with None for missing."""
    if column == "transform":
        return np.asarray(values, dtype=np.int64).astype(np.int8)
    series = pd.Series(values, dtype=object) if not isinstance(values, pd.Series) else values.reset_index(drop=True)
    if column in _EVIDENCE_NUMBERS:
        return pd.to_numeric(series, errors="coerce").astype(_EVIDENCE_NUMBERS[column]).array
    return store.shared_text(series)


def among(values: pd.Series, present) -> np.ndarray:
    """bool per row: its text is one of `present` (contents' sha256: a set, a list, an array),
    by Arrow's hash lookup. pandas' `isin` on Arrow text makes an Arrow scalar of each text looked for, ~11 us
    each: the catalog's contents check was ~2 minutes of the driver's time at 10M images."""
    if isinstance(values.dtype, pd.CategoricalDtype):  # (looked up on the categories, -1 missing)
        hit = among(pd.Series(values.cat.categories), present)
        return np.append(hit, False)[values.cat.codes.to_numpy()]
    if not len(values):
        return np.zeros(0, bool)
    arrow = isinstance(present, (pa.Array, pa.ChunkedArray))
    try:
        column = (pa.array(values.to_numpy(dtype=object), pa.string(), from_pandas=True) if values.dtype == object
                  else pa.array(values.array, from_pandas=True))
        value_set = present if arrow else pa.array(list(present), pa.string(), from_pandas=True)
        found = pc.is_in(column, value_set=value_set.cast(column.type))
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, UnicodeEncodeError):
        # (what Arrow cannot take as text, e.g. numbers or undecodable names: pandas' way)
        return values.isin(present.to_pylist() if arrow else list(present)).to_numpy(bool)
    return found.fill_null(False).to_numpy(zero_copy_only=False)


class EvidenceTable:
    """The new evidence table: the old rows whose two contents still exist, updated with this
    run's near pairs (`rows`: sha_a, sha_b, transform, ORB_COLUMNS, cosine). ORB numbers are
    stored when the verify tier ran (`verified`), cosines for the pairs that reached the confirm
    tier (`confirmed` mask); other stored values are kept. Old rows keep their order (one per
    (sha_a, sha_b, transform), the last); new pairs follow, sorted by that key when there are old
    rows. Only the row order is worked out here (integer arrays); the rows themselves are made
    `TABLE_ROWS_PER_GROUP` at a time as the table is written (`parts`), so the whole table is
    never held (at 100k files it was ~110 MB of the driver's peak, on top of `rows`).

    `values`: a frame holding the ORB_COLUMNS and cosine instead of `rows`, which then has an
    int64 column `at`, each row's position in `values` (the run's pair frame: its scores are read
    a part at a time, not copied for every pair first, ~30 B a pair)."""

    def __init__(self, cat: Catalog | None, present_sha, rows: pd.DataFrame, fps: dict,
                 verified: bool, confirmed: np.ndarray | None, values: pd.DataFrame | None = None):
        old = cat.evidence if cat is not None else _empty(EVIDENCE_COLUMNS)
        keep = among(old["sha_a"], present_sha) & among(old["sha_b"], present_sha)
        old = old[keep]
        old_t = old["transform"].to_numpy(np.int64) if len(old) else np.zeros(0, np.int64)
        old = old.assign(transform=old_t).drop_duplicates(["sha_a", "sha_b", "transform"], keep="last")
        rows = rows.reset_index(drop=True)
        rows = rows.assign(transform=rows["transform"].to_numpy(np.int64))
        repeated = rows.duplicated(["sha_a", "sha_b", "transform"], keep="last").to_numpy()
        if repeated.any():  # (the last value wins; a copy of the rows only when some repeat)
            rows = rows[~repeated]
            if confirmed is not None:
                confirmed = np.asarray(confirmed, bool)[rows.index.to_numpy()]
            rows = rows.reset_index(drop=True)
        elif confirmed is not None:
            confirmed = np.asarray(confirmed, bool)
        if len(old) and len(rows):
            old_keys, row_keys = _pair_keys(*[(f["sha_a"], f["sha_b"], f["transform"]) for f in (old, rows)])
            at = old_keys.get_indexer(row_keys)
            del old_keys, row_keys
        else:
            at = np.full(len(rows), -1, np.int64)
        added = np.flatnonzero(at < 0)  # rows of new pairs, in the table's order
        if len(old) and len(added):  # (sorted only after old rows: what Index.difference did here, kept for equal files)
            key = rows.iloc[added][["sha_a", "sha_b", "transform"]].reset_index(drop=True)
            added = added[key.sort_values(["sha_a", "sha_b", "transform"], kind="stable").index.to_numpy()]
        self._old = old.reset_index(drop=True)
        self._rows, self._confirmed, self._fps, self._verified = rows, confirmed, fps, verified
        self._values = values
        # the table's row r takes this run's values from rows[_source[r]] (-1: an old row kept as it was)
        self._source = np.concatenate([np.full(len(old), -1, np.int64), added.astype(np.int64)])
        hit = np.flatnonzero(at >= 0)
        self._source[at[hit]] = hit

    def __len__(self) -> int:
        return len(self._source)

    def parts(self) -> Iterator[pd.DataFrame]:
        """The table in row order, TABLE_ROWS_PER_GROUP rows at a time (one empty part if none)."""
        for start in range(0, max(len(self), 1), TABLE_ROWS_PER_GROUP):
            yield self._part(start, min(start + TABLE_ROWS_PER_GROUP, len(self)))

    def frame(self) -> pd.DataFrame:
        """The whole table at once (small tables: tests; the commit writes `parts`)."""
        return pd.concat(list(self.parts()), ignore_index=True)

    def _part(self, start: int, stop: int) -> pd.DataFrame:
        old, rows, n_old = self._old, self._rows, len(self._old)
        n = stop - start
        mine = self._source[start:stop]
        old_part = old.iloc[min(start, n_old):min(stop, n_old)].reset_index(drop=True)
        new_part = rows.iloc[mine[len(old_part):]]  # the added pairs in this part
        table = {c: _evidence_values(c, old_part[c].reindex(range(n))).copy()  # (copies: filled in place below)
                 for c in EVIDENCE_COLUMNS if c not in ("sha_a", "sha_b", "transform")}
        for c in ("sha_a", "sha_b"):  # (one string per content of the old rows; the run's own for the new)
            table[c] = np.concatenate([store.shared_text(old_part[c]), new_part[c].to_numpy(dtype=object)])
        table["transform"] = np.concatenate([old_part["transform"].to_numpy(np.int64),
                                             new_part["transform"].to_numpy(np.int64)]).astype(np.int8)

        def put(column: str, where: np.ndarray, values) -> None:
            table[column][where] = _evidence_values(column, values)

        scored = np.flatnonzero(mine >= 0)  # the part's rows this run scored
        # (the scores: in `rows`, or in `values` at the rows' positions)
        source, at = (rows, mine) if self._values is None else (self._values, rows["at"].to_numpy(np.int64)[mine])
        if self._verified and len(scored):
            for c in ORB_COLUMNS:
                put(c, scored, source[c].iloc[at[scored]])
            put("orb_fp", scored, np.full(len(scored), self._fps["orb"], dtype=object))
        if self._confirmed is not None and len(scored):
            cos = scored[self._confirmed[mine[scored]]]
            if len(cos):
                put("cosine", cos, source["cosine"].iloc[at[cos]])
                put("embed_fp", cos, np.full(len(cos), self._fps["embed"], dtype=object))
        return pd.DataFrame({c: pd.Series(v, dtype=object) if isinstance(v, np.ndarray) and v.dtype == object else v
                             for c, v in table.items()})[EVIDENCE_COLUMNS]


def new_feature_rows(cat: Catalog, kind: str, fp: str, summary: pd.DataFrame, sha_of_cid: pd.Series) -> pd.DataFrame:
    """Feature-index rows for features this run wrote (key, part_path, error)."""
    if summary is None or not len(summary):
        return _empty(FEATURE_COLUMNS)
    keys = summary["key"].to_numpy(np.int64)
    # named once per part file, not per row: `rel` resolves links (a realpath, an lstat per
    # folder level), and a 10k-file run's 13.5k rows name 41 files
    codes, files = pd.factorize(summary["part_path"])
    parts = np.array([cat.files.rel(p) for p in files] + [None], dtype=object).take(codes)  # (-1: none)
    return pd.DataFrame({"kind": kind, "fp": fp,
                         "sha256": sha_of_cid.reindex(keys // 8).to_numpy(dtype=object),
                         "transform": (keys % 8).astype(np.int8), "key": keys, "part": parts,
                         "error": summary["error"].astype(object).where(summary["error"].notna(), None).to_numpy()})


def parts_summary(directory: Path | str) -> pd.DataFrame:
    """key, part_path, error of every part file under `directory` (features a run just wrote; a
    folder or a store URL)."""
    files = _Files(directory)
    rows = []
    for rel in files.find("", "part-"):
        if not rel.endswith(".parquet"):
            continue
        table = files.table(rel, columns=["key", "error"]).to_pandas()
        table["part_path"] = files.full(rel)
        rows.append(table)
    if not rows:
        return pd.DataFrame({"key": np.zeros(0, np.int64), "part_path": pd.Series(dtype=object),
                             "error": pd.Series(dtype=object)})
    return pd.concat(rows, ignore_index=True)


def gather_embeddings(part_of: pd.Series, key_of_row: pd.Series, out_dir: str | Path,
                      partition_size: int) -> pd.DataFrame:
    """The high-recall screen's input from the catalog: the transform-0 embeddings of `key_of_row`
    (row idx -> catalog key content_id * 8; `part_of`: catalog key -> part path), rewritten under
    `out_dir` keyed idx * 8, sorted and split as a run from scratch writes them, so the kNN sees the
    same vectors in the same order (and finds the same neighbours). Holds the wanted embeddings
    (~5 kB per image with the default model) while it writes. Returns key, part_path, error."""
    ckeys = key_of_row.to_numpy(np.int64)
    if not len(ckeys):
        return pd.DataFrame({"key": np.zeros(0, np.int64), "part_path": pd.Series(dtype=object),
                             "error": pd.Series(dtype=object)})
    parts = part_of.reindex(ckeys)
    found = store.read_keys(ckeys[parts.notna().to_numpy()], parts.dropna().to_numpy(dtype=object)) \
        if parts.notna().any() else pd.DataFrame(columns=["embedding", "error"])
    rows = found.reindex(ckeys)  # (read_keys: each key from its own part, once)
    # a key with no part cannot happen after the screen-embed step; kept explicit
    error = rows["error"].where(parts.notna().to_numpy(), "no embedding in the catalog")
    frame = pd.DataFrame({"key": key_of_row.index.to_numpy(np.int64) * 8,
                          "embedding": rows["embedding"].to_numpy(dtype=object),
                          "error": error.to_numpy(dtype=object)}).sort_values("key", kind="stable").reset_index(drop=True)
    for col in ("embedding", "error"):
        frame[col] = frame[col].astype(object).where(frame[col].notna(), None)
    out = []
    for n, start in enumerate(range(0, len(frame), partition_size)):
        chunk = frame.iloc[start:start + partition_size].reset_index(drop=True)
        path = store.write_partition(out_dir, n, chunk)
        out.append(pd.DataFrame({"key": chunk["key"].to_numpy(np.int64), "part_path": path,
                                 "error": chunk["error"].to_numpy(dtype=object)}))
    return pd.concat(out, ignore_index=True)


def features_table(cat: Catalog, present_sha, new_rows: list[pd.DataFrame], ran: dict) -> pd.DataFrame:
    """Old feature rows of contents still present (`present_sha`: texts, `among`; of the kinds
    that ran this time: only the current settings' rows), plus the new rows."""
    old = cat.features
    old = old[among(old["sha256"], present_sha) & ~old["part"].isin(cat.bad_files)]
    for kind, fp in ran.items():
        old = old[(old["kind"] != kind) | (old["fp"] == fp)]
    frames = [f for f in [old, *new_rows] if len(f)]
    if not frames:
        return _empty(FEATURE_COLUMNS)
    out = pd.concat(frames, ignore_index=True)
    out = out.drop_duplicates(["kind", "fp", "sha256", "transform"], keep="last")
    return out.astype({"transform": "int8", "key": "int64"})[FEATURE_COLUMNS].reset_index(drop=True)
