"""The catalog: what a run learnt, kept between runs so the next one redoes only what changed.

A folder (default `OUT/catalog`, `catalog:` in the config, `--catalog DIR`):

    manifest.json                      the only entry point: generation, DATA root, settings
                                       fingerprints, and every file below with its size and sha256
    tables/images-<gen>.parquet        per file: path, size, mtime_ns, sha256, decode facts, hashes
                                       with their variants (the screen's `codes`), error, screen_fp
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

Safety. Only a run holding `.catalog.lock` (flock, like OUT's lock) writes. Files are never
modified: a run writes new files, then atomically replaces `manifest.json`. A run killed at any
point leaves the last manifest and every file it names intact; files named by no manifest are
removed by a later commit (the previous generation's files are kept one more generation, for
readers such as `dedupe query` that opened the previous manifest). Every file is checked against
its sha256 in the manifest before it is trusted (tables when the catalog is opened, feature parts
before a run reads them); a mismatch is logged, listed in run.json (`reuse.problems`) and the
affected records are recomputed.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import outdir, store
from pipeline.config import Config, ConfigError

log = logging.getLogger("pipeline")

FORMAT = 1
MANIFEST = "manifest.json"
LOCK_NAME = ".catalog.lock"
DISABLED = ("none", "off", "false", "no")

IMAGE_COLUMNS = ["path", "bytes", "mtime_ns", "sha256", "width", "height", "format", "hash", "error",
                 "codes", "variant_mask", "screen_fp"]
NEIGHBOUR_COLUMNS = ["owner", "neighbour", "hash_distance"]
EVIDENCE_COLUMNS = ["sha_a", "sha_b", "transform", "orb_fp", "orb_matches", "orb_inliers", "orb_score",
                    "orb_status", "orb_reason", "ssim", "hist_corr", "embed_fp", "cosine"]
FEATURE_COLUMNS = ["kind", "fp", "sha256", "transform", "key", "part", "error"]
# Feature parts are compacted at commit (per kind and settings) when there are more part files than
# this (a nightly run adds a few small ones) ...
COMPACT_MAX_PARTS = 64
# ... or when more than this fraction of their stored rows belong to contents no longer present.
COMPACT_DEAD_FRACTION = 0.5
COMPACT_ROWS_PER_PART = 256  # rows per compacted part (as a run writes them: dask.partition_size)
# the verify tier's evidence (keypoints, and the pixel check's numbers for flat pairs)
ORB_COLUMNS = ["orb_matches", "orb_inliers", "orb_score", "orb_status", "orb_reason", "ssim", "hist_corr"]


# ---------------------------------------------------------------------------------------------
# where, and under which settings


def resolve(cfg: Config, out: Path) -> Path | None:
    """The catalog folder for this run: None when disabled (`catalog: none`)."""
    value = (cfg.catalog or "").strip()
    if value.lower() in DISABLED:
        return None
    return Path(value) if value else Path(out) / "catalog"


def _fp(data) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


# verify keys that only affect matching and the verdict, not the per-image ORB features
_ORB_MATCH_ONLY = {"ratio", "min_keypoints", "ransac_threshold", "model", "ransac_max_iters",
                   "ransac_confidence", "min_good_matches", "match_inliers", "reject_inliers", "seed"}
_NO_EFFECT = {"opencv_threads", "max_open_partitions", "download", "batch_size", "threads"}
_SCREEN_SEARCH = {"max_distance", "max_candidates", "backend", "exact_group_pairs", "mode", "embedding_k",
                  "embedding_min_cosine", "embedding_index", "embedding_exact_max", "embedding_nprobe",
                  "embedding_shard_size", "dihedral_max_distance", "search_sharding", "search_shard_size"}


# the code and libraries that make each kind of result: a new version of either invalidates it
_CODE = {"screen": (["screen.py", "decode.py", "borders.py"], ["pillow", "imagehash", "numpy"]),
         "orb_features": (["verify.py", "decode.py"], ["opencv-python-headless", "opencv-python", "pillow", "numpy"]),
         "embed": (["confirm.py", "decode.py", "borders.py"],
                   ["tensorflow-cpu", "tensorflow", "keras", "ai-edge-litert", "pillow"])}


def _code(kind: str) -> str:
    from importlib import metadata
    files, dists = _CODE[kind]
    h = hashlib.sha256()
    here = Path(__file__).resolve().parent
    for name in files:
        h.update((here / name).read_bytes())
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
    screen["code"] = _code("screen")
    orb_features = {k: x for k, x in v.items() if k not in _ORB_MATCH_ONLY | _NO_EFFECT}
    orb_features["decode_max_pixels"] = s["max_pixels"]
    orb_features["code"] = _code("orb_features")
    embed = {k: x for k, x in e.items() if k not in _NO_EFFECT}
    embed["code"] = _code("embed")
    embed.update(border_tolerance=s["border_tolerance"], trim_frames=s["trim_frames"],
                 decode_max_pixels=s["max_pixels"],
                 weights_sha256=(weights_info or {}).get("sha256"))
    out = {"screen": _fp(screen), "orb_features": _fp(orb_features), "embed": _fp(embed)}
    out["neighbours"] = _fp([out["screen"], {k: s[k] for k in sorted(_SCREEN_SEARCH)}])
    out["orb"] = _fp([out["orb_features"], {k: x for k, x in v.items() if k in _ORB_MATCH_ONLY}])
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


def file_sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


# ---------------------------------------------------------------------------------------------
# the catalog


def _empty(columns: list[str]) -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=object) for c in columns})


@dataclass
class Catalog:
    directory: Path
    manifest: dict = field(default_factory=dict)
    images: pd.DataFrame = field(default_factory=lambda: _empty(IMAGE_COLUMNS))
    neighbours: pd.DataFrame = field(default_factory=lambda: _empty(NEIGHBOUR_COLUMNS))
    evidence: pd.DataFrame = field(default_factory=lambda: _empty(EVIDENCE_COLUMNS))
    features: pd.DataFrame = field(default_factory=lambda: _empty(FEATURE_COLUMNS))
    problems: list[str] = field(default_factory=list)
    _checked: dict[str, bool] = field(default_factory=dict)
    bad_files: set[str] = field(default_factory=set)  # failed their check: never listed again

    # -- reading ------------------------------------------------------------------------------

    @classmethod
    def load(cls, directory: str | Path) -> "Catalog":
        """Read the manifest and its tables, each checked against its sha256. A missing catalog is
        an empty one; a corrupt table is reported (`problems`, a warning) and treated as empty."""
        cat = cls(Path(directory))
        path = cat.directory / MANIFEST
        if not path.exists():
            return cat
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
            if manifest.get("format") != FORMAT:
                raise ValueError(f"format {manifest.get('format')!r}, expected {FORMAT}")
        except (OSError, ValueError) as exc:
            cat._problem(f"{path}: unreadable manifest ({exc}); the catalog is rebuilt from scratch")
            return cat
        cat.manifest = manifest
        for name, columns in (("images", IMAGE_COLUMNS), ("neighbours", NEIGHBOUR_COLUMNS),
                              ("evidence", EVIDENCE_COLUMNS), ("features", FEATURE_COLUMNS)):
            entry = manifest.get("tables", {}).get(name)
            if not entry:
                continue
            if not cat.verify_file(entry["file"], entry):
                continue
            try:
                frame = pq.read_table(cat.directory / entry["file"]).to_pandas()
            except Exception as exc:  # checked above; still, never trust a table that does not parse
                cat._problem(f"{entry['file']}: cannot be read ({exc}); rebuilt")
                continue
            setattr(cat, name, frame[columns])
        return cat

    def _problem(self, message: str) -> None:
        log.warning("catalog: %s", message)
        self.problems.append(message)

    def verify_file(self, rel: str, entry: dict | None = None) -> bool:
        """Is `rel` (relative to the catalog) present with the size and sha256 the manifest names?"""
        if rel in self._checked:
            return self._checked[rel]
        entry = entry or self.manifest.get("parts", {}).get(rel)
        path = self.directory / rel
        ok = False
        if entry is None:
            self._problem(f"{rel}: not listed in the manifest; not used")
        elif not path.is_file():
            self._problem(f"{rel}: missing; its records are recomputed")
        elif path.stat().st_size != entry["bytes"] or file_sha256(path) != entry["sha256"]:
            self._problem(f"{rel}: checksum mismatch (corrupt); its records are recomputed")
        else:
            ok = True
        self._checked[rel] = ok
        if not ok:
            self.bad_files.add(rel)
        return ok

    @property
    def root(self) -> str | None:
        return self.manifest.get("root")

    def fingerprint(self, kind: str) -> str | None:
        return self.manifest.get("fingerprints", {}).get(kind)

    def feature_parts(self, kind: str, fp: str, sha256, transform) -> tuple[pd.Series, dict]:
        """Stored features of `kind` made with settings `fp` for the wanted (sha256, transform):
        Series key (content_id * 8 + transform) -> absolute part path, only from parts whose
        checksum holds. Also counts: how many were found, and why others were not."""
        want = pd.DataFrame({"sha256": pd.Series(sha256, dtype=object).to_numpy(),
                             "transform": np.asarray(transform, dtype=np.int64)}).drop_duplicates()
        rows = self.features[(self.features["kind"] == kind)]
        same = rows[rows["fp"] == fp]
        hit = want.merge(same[["sha256", "transform", "key", "part"]].astype({"transform": "int64"}),
                         on=["sha256", "transform"], how="inner")
        parts = {p: self.verify_file(p) for p in pd.unique(hit["part"])}
        hit = hit[hit["part"].map(parts).astype(bool)] if len(hit) else hit
        other = want.merge(rows[rows["fp"] != fp][["sha256", "transform"]].drop_duplicates()
                           .astype({"transform": "int64"}), on=["sha256", "transform"], how="inner")
        counts = {"reused": int(len(hit)), "wanted": int(len(want)),
                  "settings_changed": int(len(other)) - int(other.merge(hit, on=["sha256", "transform"]).shape[0])}
        series = pd.Series([str(self.directory / p) for p in hit["part"]], index=hit["key"].to_numpy(np.int64),
                           dtype=object)
        return series, counts

    def orphan_parts(self, kind: str, fp: str, sha_of_cid: pd.Series) -> pd.DataFrame:
        """Feature parts a killed run finished (complete files: the store writes each part to a
        temporary name and renames it) but never listed: key, part_path, error of the rows whose
        content is still present, to be adopted instead of recomputed."""
        base = self.directory / "features" / kind / fp
        listed = set(self.manifest.get("parts", {}))
        frames = []
        for path in sorted(base.rglob("part-*.parquet")) if base.exists() else []:
            if str(path.relative_to(self.directory)) in listed:
                continue
            try:
                table = pq.read_table(path, columns=["key", "error"]).to_pandas()
            except Exception:  # not a whole Parquet file: garbage, removed at the next commit
                continue
            table["part_path"] = str(path)
            frames.append(table)
        if not frames:
            return pd.DataFrame({"key": np.zeros(0, np.int64), "part_path": pd.Series(dtype=object),
                                 "error": pd.Series(dtype=object)})
        found = pd.concat(frames, ignore_index=True)
        found = found[pd.Index(found["key"] // 8).isin(sha_of_cid.index)]
        return found.drop_duplicates("key", keep="last").reset_index(drop=True)

    def feature_dir(self, kind: str, fp: str, run_id: str) -> Path:
        return self.directory / "features" / kind / fp / run_id

    # -- writing (the caller holds the lock) --------------------------------------------------

    def commit(self, *, root: str, run_id: str, fps: dict, images: pd.DataFrame, neighbours: pd.DataFrame | None,
               evidence: pd.DataFrame, features: pd.DataFrame, config: dict | None = None) -> dict:
        """Write the new tables, then switch the manifest atomically; remove files no manifest of
        this or the previous generation names. Returns the new manifest."""
        previous = self.manifest
        generation = int(previous.get("generation", 0)) + 1
        tag = f"{generation:06d}-{uuid.uuid4().hex[:8]}"
        tables_dir = self.directory / "tables"
        tables_dir.mkdir(parents=True, exist_ok=True)
        tables = {}
        fingerprints_ = dict(previous.get("fingerprints", {}))
        fingerprints_.update(fps)
        if neighbours is None:  # this run did not search (nothing to keep)
            neighbours = _empty(NEIGHBOUR_COLUMNS)
        features, compacted = self.compact(features, tag)
        for name, frame in (("images", images), ("neighbours", neighbours), ("evidence", evidence),
                            ("features", features)):
            rel = f"tables/{name}-{tag}.parquet"
            _write_parquet(frame, self.directory / rel)
            tables[name] = _entry(self.directory, rel)
        parts = {}
        old_parts = previous.get("parts", {})
        for rel in sorted(pd.unique(features["part"].astype(str))) if len(features) else []:
            parts[rel] = old_parts.get(rel) or _entry(self.directory, rel)
        manifest = {"format": FORMAT, "generation": generation, "run_id": run_id, "root": root,
                    "updated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "fingerprints": fingerprints_, "config": config or previous.get("config"),
                    "tables": tables, "parts": parts,
                    "counts": {"images": int(len(images)), "pairs_with_evidence": int(len(evidence)),
                               "features": int(len(features))}, "compacted": compacted}
        tmp = self.directory / f".{MANIFEST}.{uuid.uuid4().hex}.tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(manifest, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.directory / MANIFEST)
        _fsync_dir(self.directory)
        self.manifest = manifest
        self.collect_garbage(keep=[previous, manifest])
        return manifest

    def compact(self, features: pd.DataFrame, tag: str) -> tuple[pd.DataFrame, list[dict]]:
        """Rewrite the referenced rows of each (kind, fp) whose parts are too many or mostly dead
        (COMPACT_MAX_PARTS, COMPACT_DEAD_FRACTION) into new parts of COMPACT_ROWS_PER_PART rows,
        reading one old part at a time. Returns the features table pointing at the new parts and
        what was compacted. The old parts stay until garbage collection (two generations later)."""
        done = []
        if not len(features):
            return features, done
        features = features.copy()
        for (kind, fp), group in features.groupby(["kind", "fp"], sort=True):
            parts = sorted(pd.unique(group["part"].astype(str)))
            stored = sum(_num_rows(self.directory / p) for p in parts)
            if len(parts) <= COMPACT_MAX_PARTS and len(group) >= stored * (1 - COMPACT_DEAD_FRACTION):
                continue
            out_dir = self.directory / "features" / kind / fp / f"compact-{tag}"
            part_of_key: dict[int, str] = {}
            buffer: list[pa.Table] = []

            def flush() -> None:  # (a part whose error column is all null has type null: promote)
                merged = pa.concat_tables(buffer, promote_options="default").sort_by("key")
                buffer.clear()
                if merged.num_rows:
                    path = store.write_partition(out_dir, len(set(part_of_key.values())), merged)
                    part_of_key.update(dict.fromkeys(merged["key"].to_pylist(),
                                                     str(Path(path).relative_to(self.directory))))

            for part in parts:
                rows = group[group["part"] == part]
                listed = part in self.manifest.get("parts", {})  # else written by this run
                if listed and not self.verify_file(part):  # corrupt: its features are recomputed later
                    features = features.drop(index=rows.index)
                    continue
                table = pq.read_table(self.directory / part)
                buffer.append(table.filter(pc.is_in(table["key"], value_set=pa.array(rows["key"].to_numpy(np.int64)))))
                if sum(t.num_rows for t in buffer) >= COMPACT_ROWS_PER_PART:
                    flush()
            if buffer:
                flush()
            mine = features.index[(features["kind"] == kind) & (features["fp"] == fp)]
            features.loc[mine, "part"] = features.loc[mine, "key"].map(part_of_key).to_numpy(dtype=object)
            features = features[features["part"].notna()]  # rows whose part did not hold their key
            mine = features.index[(features["kind"] == kind) & (features["fp"] == fp)]
            written = len(set(part_of_key.values()))
            kept = len(mine)
            done.append({"kind": kind, "fp": fp, "parts_before": len(parts), "rows_stored_before": int(stored),
                         "rows_kept": int(kept), "parts_after": written})
            log.info("catalog: compacted %s features (%d parts, %d rows -> %d parts, %d rows)", kind,
                     len(parts), stored, written, kept)
        return features, done

    def collect_garbage(self, keep: list[dict]) -> list[str]:
        """Remove files under tables/ and features/ that none of the `keep` manifests names (left by
        killed runs, or superseded two generations ago)."""
        named = {MANIFEST}
        for m in keep:
            named |= {e["file"] for e in m.get("tables", {}).values()}
            named |= set(m.get("parts", {}))
        removed = []
        for sub in ("tables", "features"):
            base = self.directory / sub
            if not base.exists():
                continue
            for path in sorted(base.rglob("*")):
                if path.is_file() and str(path.relative_to(self.directory)) not in named:
                    path.unlink(missing_ok=True)
                    removed.append(str(path.relative_to(self.directory)))
            for path in sorted(base.rglob("*"), reverse=True):  # empty folders, deepest first
                if path.is_dir() and not any(path.iterdir()):
                    path.rmdir()
        for path in self.directory.glob(f".{MANIFEST}.*.tmp"):
            path.unlink(missing_ok=True)
        if removed:
            log.info("catalog: removed %d file(s) no longer referenced", len(removed))
        return removed


def _num_rows(path: Path) -> int:
    """Rows in a Parquet file; 0 when it cannot be read (compaction then checks and drops it)."""
    try:
        return pq.ParquetFile(path).metadata.num_rows
    except Exception:
        return 0


def _write_parquet(frame: pd.DataFrame, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    table = pa.Table.from_pandas(frame.reset_index(drop=True), preserve_index=False)
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, path)


def _entry(directory: Path, rel: str) -> dict:
    path = directory / rel
    return {"file": rel, "bytes": path.stat().st_size, "sha256": file_sha256(path)}


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def opened(directory: str | Path) -> Iterator[Catalog]:
    """Hold the catalog's lock (a second run exits 2 naming the holder) and load it."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ConfigError(f"catalog path {str(directory)!r} exists and is not a folder: choose another --catalog")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create the catalog folder {str(directory)!r} ({exc.strerror}): "
                          "choose another --catalog") from None
    with outdir.locked(directory, name=LOCK_NAME, what="catalog", option="--catalog"):
        before = _files(directory)
        try:
            yield Catalog.load(directory)
        except BaseException:  # a failed or stopped run: remove what it wrote that no manifest names
            named: set[str] = set()
            with contextlib.suppress(OSError, ValueError):  # stopped after its commit: keep that
                current = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
                named = {e["file"] for e in current.get("tables", {}).values()} | set(current.get("parts", {}))
            for rel in sorted(_files(directory) - before - named):
                (directory / rel).unlink(missing_ok=True)
            raise


def _files(directory: Path) -> set[str]:
    out = set()
    for sub in ("tables", "features"):
        base = directory / sub
        if base.exists():
            out |= {str(p.relative_to(directory)) for p in base.rglob("*") if p.is_file()}
    return out


def remove(directory: str | Path) -> None:
    shutil.rmtree(directory, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# what a run takes from the catalog, and what it gives back


def known_records(cat: Catalog | None, fps: dict, root: str, reuse: dict) -> dict | None:
    """Per-image records of the catalog's folder: path -> record; `stale` when made with other
    screen settings (then the file is screened again)."""
    if cat is None:
        return None
    if cat.root is not None and cat.root != root:
        reuse["not_reused"] = f"the catalog was made for another folder ({cat.root})"
        return {}
    recs = cat.images.astype(object).where(cat.images.notna(), None)
    out = {r["path"]: r for r in recs.to_dict("records")}
    for r in out.values():  # made with other screen settings (or code): to be screened again
        r["stale"] = r["screen_fp"] != fps["screen"]
    return out


def previous_lists(cat: Catalog | None, images: pd.DataFrame, representative: np.ndarray, fps: dict,
                   reuse: dict) -> tuple[pd.DataFrame, np.ndarray] | None:
    """The last run's K-nearest lists in current row numbers (-1 for images gone or changed) and
    `same` (N,): images that took part last time with the same content and hashes."""
    if cat is None:
        return None
    if cat.fingerprint("neighbours") != fps["neighbours"] or not len(cat.images):
        reuse["searched_all_because"] = ("no previous lists" if cat.fingerprint("neighbours") is None
                                         else "screen or search settings changed")
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
    directed = pd.DataFrame({"owner_a": row_of.reindex(nb["owner"].to_numpy()).fillna(-1).to_numpy(np.int64),
                             "owner_b": row_of.reindex(nb["neighbour"].to_numpy()).fillna(-1).to_numpy(np.int64),
                             "hash_distance": nb["hash_distance"].to_numpy(np.int16)})
    return directed, same


def neighbours_table(directed: pd.DataFrame, images: pd.DataFrame) -> pd.DataFrame:
    paths = images["path"].to_numpy(dtype=object)
    return pd.DataFrame({"owner": paths[directed["owner_a"].to_numpy(np.int64)],
                         "neighbour": paths[directed["owner_b"].to_numpy(np.int64)],
                         "hash_distance": directed["hash_distance"].to_numpy(np.int16)})


def images_table(images: pd.DataFrame, fps: dict) -> pd.DataFrame:
    out = images[[c for c in IMAGE_COLUMNS if c != "screen_fp"]].copy()
    out["screen_fp"] = fps["screen"]
    return out.astype({"bytes": "int64", "mtime_ns": "int64", "width": "Int64", "height": "Int64",
                       "variant_mask": "int64"})


def _pair_key(sha_a, sha_b, transform) -> np.ndarray:
    return (pd.Series(sha_a, dtype=object).astype(str).to_numpy() + ":" +
            pd.Series(sha_b, dtype=object).astype(str).to_numpy() + ":" +
            pd.Series(np.asarray(transform, dtype=np.int64)).astype(str).to_numpy()).astype(object)


def lookup_evidence(cat: Catalog | None, sha_a, sha_b, transform, what: str, fp: str) -> tuple[np.ndarray, pd.DataFrame]:
    """Stored evidence for pairs of contents: (hit mask, frame of the columns), `what` = "orb"
    (ORB_COLUMNS, made with settings `fp`) or "cosine"; "orb_any"/"cosine_any": made with any settings."""
    n = len(sha_a)
    columns = ORB_COLUMNS if what.startswith("orb") else ["cosine"]
    if cat is None or not len(cat.evidence):
        return np.zeros(n, bool), pd.DataFrame(index=range(n), columns=columns)
    ev = cat.evidence
    fp_col = "orb_fp" if what.startswith("orb") else "embed_fp"
    ev = ev[ev[fp_col].notna()] if what.endswith("_any") else ev[ev[fp_col] == fp]
    # only rows of the contents asked about get a key (a query asks about a few of 100k+ rows)
    ev = ev[ev["sha_a"].isin(pd.unique(np.asarray(sha_a, dtype=object))).to_numpy()
            & ev["sha_b"].isin(pd.unique(np.asarray(sha_b, dtype=object))).to_numpy()]
    table = ev.set_index(_pair_key(ev["sha_a"], ev["sha_b"], ev["transform"]))[columns]
    table = table[~table.index.duplicated(keep="last")]
    keys = _pair_key(sha_a, sha_b, transform)
    hit = pd.Index(table.index).get_indexer(keys) >= 0
    found = table.reindex(keys).reset_index(drop=True)
    return hit, found


def evidence_table(cat: Catalog | None, present_sha: set, rows: pd.DataFrame, fps: dict,
                   verified: bool, confirmed: np.ndarray | None) -> pd.DataFrame:
    """The new evidence table: the old rows whose two contents still exist, updated with this
    run's near pairs (`rows`: sha_a, sha_b, transform, ORB_COLUMNS, cosine). ORB numbers are
    stored when the verify tier ran (`verified`), cosines for the pairs that reached the confirm
    tier (`confirmed` mask); other stored values are kept."""
    old = cat.evidence if cat is not None else _empty(EVIDENCE_COLUMNS)
    keep = old["sha_a"].isin(present_sha).to_numpy() & old["sha_b"].isin(present_sha).to_numpy()
    old = old[keep]
    table = old.set_index(pd.Index(_pair_key(old["sha_a"], old["sha_b"], old["transform"]), dtype=object))
    table = table[~table.index.duplicated(keep="last")][EVIDENCE_COLUMNS].astype(object)
    keys = pd.Index(_pair_key(rows["sha_a"], rows["sha_b"], rows["transform"]), dtype=object)
    new_keys = keys.difference(table.index)
    if len(new_keys):
        table = pd.concat([table, pd.DataFrame(index=new_keys, columns=EVIDENCE_COLUMNS, dtype=object)])
    base = pd.DataFrame({"sha_a": rows["sha_a"].to_numpy(dtype=object), "sha_b": rows["sha_b"].to_numpy(dtype=object),
                         "transform": rows["transform"].to_numpy(np.int64)}, index=keys)
    table.loc[keys, ["sha_a", "sha_b", "transform"]] = base.astype(object).to_numpy()
    if verified and len(rows):
        orb = rows[ORB_COLUMNS].astype(object).where(rows[ORB_COLUMNS].notna(), None).to_numpy()
        table.loc[keys, ORB_COLUMNS] = orb
        table.loc[keys, "orb_fp"] = fps["orb"]
    if confirmed is not None and confirmed.any():
        ck = keys[confirmed]
        table.loc[ck, "cosine"] = rows["cosine"].to_numpy()[confirmed].astype(object)
        table.loc[ck, "embed_fp"] = fps["embed"]
    out = table.reset_index(drop=True)
    out["transform"] = out["transform"].astype(np.int8)
    for col, dtype in (("orb_matches", "Int32"), ("orb_inliers", "Int32"), ("orb_score", "Float32"),
                       ("ssim", "Float32"), ("hist_corr", "Float32"), ("cosine", "Float32")):
        out[col] = pd.to_numeric(out[col], errors="coerce").astype(dtype)
    for col in ("sha_a", "sha_b", "orb_fp", "orb_status", "orb_reason", "embed_fp"):
        out[col] = out[col].astype(object).where(out[col].notna(), None)
    return out[EVIDENCE_COLUMNS]


def new_feature_rows(cat: Catalog, kind: str, fp: str, summary: pd.DataFrame, sha_of_cid: pd.Series) -> pd.DataFrame:
    """Feature-index rows for features this run wrote (key, part_path, error)."""
    if summary is None or not len(summary):
        return _empty(FEATURE_COLUMNS)
    keys = summary["key"].to_numpy(np.int64)
    parts = [str(Path(p).resolve().relative_to(cat.directory.resolve())) for p in summary["part_path"]]
    return pd.DataFrame({"kind": kind, "fp": fp,
                         "sha256": sha_of_cid.reindex(keys // 8).to_numpy(dtype=object),
                         "transform": (keys % 8).astype(np.int8), "key": keys, "part": parts,
                         "error": summary["error"].astype(object).where(summary["error"].notna(), None).to_numpy()})


def parts_summary(directory: Path) -> pd.DataFrame:
    """key, part_path, error of every part file under `directory` (features a run just wrote)."""
    rows = []
    for path in sorted(Path(directory).rglob("part-*.parquet")):
        table = pq.read_table(path, columns=["key", "error"]).to_pandas()
        table["part_path"] = str(path)
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
    found = store.read_rows(list(pd.unique(parts.dropna())), ckeys[parts.notna().to_numpy()]) \
        if parts.notna().any() else pd.DataFrame(columns=["embedding", "error"])
    rows = found[~found.index.duplicated()].reindex(ckeys)  # (a content in two parts: either copy)
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


def features_table(cat: Catalog, present_sha: set, new_rows: list[pd.DataFrame], ran: dict) -> pd.DataFrame:
    """Old feature rows of contents still present (of the kinds that ran this time: only the
    current settings' rows), plus the new rows."""
    old = cat.features
    old = old[old["sha256"].isin(present_sha) & ~old["part"].isin(cat.bad_files)]
    for kind, fp in ran.items():
        old = old[(old["kind"] != kind) | (old["fp"] == fp)]
    frames = [f for f in [old, *new_rows] if len(f)]
    if not frames:
        return _empty(FEATURE_COLUMNS)
    out = pd.concat(frames, ignore_index=True)
    out = out.drop_duplicates(["kind", "fp", "sha256", "transform"], keep="last")
    return out.astype({"transform": "int8", "key": "int64"})[FEATURE_COLUMNS].reset_index(drop=True)
