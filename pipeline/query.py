"""`dedupe query IMAGE... --catalog DIR`: which catalog images does each image duplicate?

The same cascade and rule as the batch job, for a few images against a catalog built by it
(pipeline/catalog.py), with the catalog's settings unless overridden:

1. screen each query image (one read, one decode: sha256, hashes and their variants);
2. candidates, as the batch job forms them with the query files in the folder: catalog and
   query files with the same sha256 (exact; a query file's own record is no catalog image here:
   the query is that file as it is now), and near pairs by hash: the query's K
   nearest catalog and query images, plus each catalog image that would take the query into its
   own K nearest (its list re-derived from the catalog's hashes and the queries'). The images
   are numbered in the folder's path order (a query outside the folder after every file in
   it), as the batch job numbers them: a pair's first image is the first in that order (ORB's
   numbers depend on it, and the stored scores are found by it), and a tie at a list's K-th
   distance goes to the first;
3. verify and confirm with the catalog's stored ORB features, embeddings and pair scores where
   they were made with the same settings, computing only what is missing;
4. decide with `pipeline.decide` (same `rule` codes).

Nothing is written to the catalog unless `add=True` (`--add`): then the query images, which must
lie inside the catalog's folder, become catalog records with their features and pair scores, as if
the batch job had seen them (the next batch run finds them unchanged).
"""
from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline import candidates, catalog, decide, paths, scan, screen, storage
from pipeline.config import Config, ConfigError, ScanConfig, config_from_dict

log = logging.getLogger("pipeline")

OUTPUT_COLUMNS = ["query", "path", "image_id", "hash_distance", "orb_matches", "orb_inliers", "orb_score",
                  "cosine", "stage", "is_duplicate", "reason", "rule", "query_error"]
TIER_ORDER = {"screen": 0, "verify": 1, "confirm": 2}


def _query_entries(paths: list[str | Path], cfg: ScanConfig) -> list[scan.FileEntry]:
    """One entry per file: a file named twice, or by two spellings, is asked about once. Its abs
    path is the path as given, made absolute (nothing resolved: a link inside the folder is a
    file of its own there, as the batch job lists it, not its target). Its error as the batch
    job's listing gives it (`scan.classify`: unreadable, empty, past scan.max_file_bytes, not an
    image), whatever its name."""
    entries, seen = [], set()
    for p in paths:
        if storage.is_url(str(p)):  # (the catalog may be on a store; the images asked about are files here)
            raise ConfigError(f"query image {str(p)!r} is a URL: query images are local files (copy the object "
                              "here first; the catalog itself may be on the store)")
        path = Path(p)
        if not path.is_file():
            raise ConfigError(f"query image {str(p)!r} does not exist or is not a file")
        same = os.path.join(os.path.realpath(os.path.dirname(os.path.abspath(path))), path.name)
        if same in seen:
            continue
        seen.add(same)
        st = path.stat()
        image, error = scan.classify(os.path.abspath(path), st.st_size, cfg)
        if not image and not error:  # (not an image, and not named as one: the batch job would not list it)
            error = NOT_LISTED
        entries.append(scan.FileEntry(str(p), os.path.abspath(path), st.st_size, st.st_mtime, error,
                                       scan.mtime_ns_64(st.st_mtime_ns)))
    return entries


NOT_LISTED = "not an image: content matches no known image format, nor does its name say image"


def _skipped_folder(abs_path: str, root: str) -> str | None:
    """The folder between the catalog's folder and this file that the batch job does not go into
    (it holds an OUT's or a catalog's lock file: a run's outputs, thumbnails included), or None."""
    from pipeline import outdir
    folder = os.path.dirname(abs_path)
    root = os.path.abspath(root)
    while folder.startswith(os.path.join(root, "")) and folder != root:
        if any(os.path.lexists(os.path.join(folder, m)) for m in (outdir.LOCK_NAME, catalog.LOCK_NAME)):
            return folder
        folder = os.path.dirname(folder)
    return None


def _inside(entries: list[scan.FileEntry], cat: catalog.Catalog) -> list[str | None]:
    """Each query file's path relative to the catalog's folder as the batch job would list it, the
    name as the filesystem holds it (None: outside the folder, or a catalog on a store). A file
    is inside when its path as given is under the folder's, or, with the links of both resolved
    (a folder reached through a link), its folder is under the folder's."""
    if storage.is_url(cat.root):
        return [None] * len(entries)
    given = os.path.join(os.path.abspath(str(cat.root)), "")
    real = os.path.join(os.path.realpath(str(cat.root)), "")
    out = []
    for e in entries:
        resolved = os.path.join(os.path.realpath(os.path.dirname(e.abs_path)), os.path.basename(e.abs_path))
        out.append(Path(e.abs_path[len(given):]).as_posix() if e.abs_path.startswith(given) else
                   Path(resolved[len(real):]).as_posix() if resolved.startswith(real) else None)
    return out


def _settings(cat: catalog.Catalog, cfg: Config | None, overrides: list[str] | None) -> Config:
    if cfg is not None:
        return cfg
    return config_from_dict(cat.manifest.get("config") or {}, overrides)


def query(paths: list[str | Path], catalog_dir: str | Path, cfg: Config | None = None,
          overrides: list[str] | None = None, add: bool = False, client=None, progress=None,
          storage_options: dict | None = None) -> pd.DataFrame:
    """One row per (query image, catalog image it was compared with): OUTPUT_COLUMNS, duplicates
    first. `cfg`: the settings (default: the catalog's, with `overrides` applied). A query image
    that cannot be decoded gets one row with `query_error` set. `storage_options`: the store's
    (a catalog on a store; default: `cfg`'s, else those of `overrides`' storage.*)."""
    cat_dir = storage.local_form(catalog_dir)
    if storage.is_url(cat_dir):
        cat_dir = str(cat_dir).rstrip("/")
        if add:
            raise ConfigError(f"--add with a catalog on object storage ({cat_dir}) is not supported: upload "
                              "the images into the catalog's DATA prefix and run the batch job again")
        # the store's options before the catalog's config is read: the defaults with --set storage.options=…
        if storage_options is None:
            storage_options = config_from_dict({}, [o for o in overrides or [] if o.startswith("storage.")]) \
                .storage.options if cfg is None else cfg.storage.options
        storage.configure(storage_options)
    else:
        cat_dir = Path(os.path.abspath(cat_dir))  # (a cluster's workers write under it from their own folders)
    if not catalog.exists(cat_dir):
        raise ConfigError(f"no catalog at {str(cat_dir)!r}: build one with `dedupe dedupe DATA --out OUT` "
                          "(it is kept in OUT/catalog) or pass --catalog DIR")
    opener = catalog.opened(cat_dir) if add else contextlib.nullcontext(catalog.Catalog.load(cat_dir))
    with opener as cat:
        if cat.problems:  # a table failed its checksum: answering from the rest would be wrong
            raise ConfigError(f"the catalog at {str(cat_dir)!r} is damaged ({'; '.join(cat.problems)}): "
                              "re-run the batch job into it to rebuild it")
        cfg = _settings(cat, cfg, overrides)
        if cfg.screen.mode == "hash+embedding":
            log.warning("query: the catalog was built in high-recall mode; a query forms hash candidates "
                        "only (embedding neighbours are found by the batch job)")
        weights_info = None
        if TIER_ORDER[cfg.tiers] >= TIER_ORDER["confirm"]:
            from pipeline import weights
            weights_info = weights.check_weights_available(cfg.embed)
        fps = catalog.fingerprints(cfg, weights_info)
        if cat.fingerprint("screen") != fps["screen"]:
            raise ConfigError("the catalog's hashes were made with other screen settings than this query's: "
                              "query with the catalog's settings (no --set screen.*) or re-run the batch job")
        if add:  # what --add stores must be what the batch job would store with the catalog's settings
            own = catalog.fingerprints(config_from_dict(cat.manifest.get("config") or {}), weights_info)
            other = [k for k in ("neighbours", "orb_features", "orb", "embed") if own[k] != fps[k]]
            if other:
                raise ConfigError(f"--add records the images with the catalog's settings, and this query's "
                                  f"differ ({', '.join(other)}): drop the --set options that change them, or "
                                  "run the batch job with the new settings")
        entries = _query_entries(paths, cfg.scan)
        rel = _inside(entries, cat)
        if add:  # (before any work)
            outside = [e.path for e, r in zip(entries, rel) if r is None]
            if outside:
                raise ConfigError(f"--add: {outside[0]!r} is not inside the catalog's folder {str(cat.root)!r}: "
                                  "copy it there first (the catalog mirrors that folder)")
            # (a file the batch job does not list would be dropped from the catalog by its next run)
            unlisted = [e.path for e, r in zip(entries, rel)
                        if (cfg.scan.skip_hidden and any(part.startswith(".") for part in r.split("/")))
                        or (not cfg.scan.follow_symlinks and os.path.islink(e.abs_path))]
            if unlisted:
                raise ConfigError(f"--add: {unlisted[0]!r} is a file the batch job does not list (a hidden name, "
                                  "scan.skip_hidden, or a link, scan.follow_symlinks): its next run would drop it "
                                  "from the catalog")
            for e in entries:
                if e.error == NOT_LISTED:
                    raise ConfigError(f"--add: {e.path!r} is not an image (neither its content nor its name says "
                                      "so): the batch job does not list it")
                held = _skipped_folder(e.abs_path, str(cat.root))
                if held is not None:
                    raise ConfigError(f"--add: {e.path!r} is in {held!r}, a run's output or catalog folder, which "
                                      "the batch job does not scan")
        with tempfile.TemporaryDirectory(prefix="dedupe-query-") as tmp:
            return _query(entries, rel, cat, cfg, fps, add, Path(tmp), client, progress)


def _query(entries, rel: list[str | None], cat: catalog.Catalog, cfg: Config, fps: dict, add: bool, tmp: Path,
           client, progress):
    from pipeline.run import image_ids, representatives  # one definition of both
    old = cat.images.sort_values("path", kind="stable").reset_index(drop=True)
    q = screen.screen_partition(entries, cfg.screen)
    # the catalog's record of a query file is not a catalog image to compare it with: the query is
    # that file as it is now (rewritten since, or not)
    named = [paths.text_form(r) if r is not None else None for r in rel]  # (as the catalog names files)
    old = old[~old["path"].isin([r for r in named if r is not None])].reset_index(drop=True)
    # string joins: a Path per catalog row costs ~1 s per 100k (a store URL keeps its "//")
    prefix = cat.root.rstrip("/") + "/" if storage.is_url(cat.root) else os.path.join(str(Path(cat.root)), "")
    old = old.assign(abs_path=[prefix + p if storage.is_url(prefix) else paths.os_file(prefix + p)
                               for p in old["path"]])
    n_old = len(old)
    cols = ["path", "abs_path", "sha256", "error", "codes", "variant_mask", "bytes", "mtime_ns"]
    # the catalog's and the query's files in the folder's path order, numbered as the batch job
    # numbers its images: a pair's first image is its first in that order (ORB's numbers depend on
    # which is first, and the stored scores are found by it), a tie at a list's K-th distance
    # goes to the first in it, and so do byte-identical files' pairs. A query file outside the
    # folder sorts after every file in it, by its own path. (The catalog's rows are in that order
    # already: the queries go in at their places, found by one binary search, and the rows are
    # copied once, not the whole table sorted.)
    ask = sorted(range(len(entries)), key=lambda j: (named[j] is None, named[j] or entries[j].abs_path))
    inside = [j for j in ask if named[j] is not None]
    places = np.full(len(ask), n_old, np.int64)
    if inside:
        places[:len(inside)] = old["path"].array.searchsorted(np.array([named[j] for j in inside], dtype=object))
    order = np.insert(np.arange(n_old), places, n_old + np.asarray(ask, np.int64))
    bounds = np.concatenate([[0], places, [n_old]])
    pieces = []
    for k, j in enumerate(ask):
        pieces += [old.iloc[bounds[k]:bounds[k + 1]][cols], q.iloc[[j]][cols]]
    rows = pd.concat([*pieces, old.iloc[bounds[-2]:][cols]], ignore_index=True) if ask else old[cols]
    del pieces
    is_query = order >= n_old
    old_rep = np.zeros(len(rows), bool)
    old_rep[np.flatnonzero(~is_query)] = representatives(old).to_numpy()  # (old is in path order)
    codes, mask = screen.unpack_codes(rows, cfg.screen)
    valid = (rows["error"].isna() & rows["codes"].notna()).to_numpy()
    qvalid = is_query & valid
    sha = rows["sha256"].to_numpy(dtype=object)

    # exact: every catalog file, and every other query file, with the same bytes, paired as the
    # batch job pairs them (all pairs, or past screen.exact_group_pairs a star from the group's
    # first file: `candidates.exact_pairs`)
    # (the catalog rows holding a query's bytes found in one pass: a comparison of every catalog
    # row for each query image was ~55 ms a query at 10M images)
    with_query_bytes: dict[str, list[int]] = {}
    known_copies = ~is_query & pd.Series(sha, dtype=object).isin(pd.unique(sha[qvalid])).to_numpy()
    for i in np.flatnonzero(known_copies):
        with_query_bytes.setdefault(sha[i], []).append(int(i))
    # (the first in path order of the catalog's representative and the queries with those bytes
    # stands for them, as in the batch job)
    stands = {h: next((i for i in found if old_rep[i]), None) for h, found in with_query_bytes.items()}
    twin = np.full(len(rows), -1, np.int64)
    for qi in np.flatnonzero(qvalid):  # (in path order)
        first = stands.get(sha[qi])
        if first is None:
            stands[sha[qi]] = qi
        elif first > qi:  # a catalog file after the query: the query stands for it
            old_rep[first] = False
            stands[sha[qi]] = qi
        else:
            twin[qi] = first
    among = np.flatnonzero(known_copies | qvalid)  # (the queries and the catalog's files with their bytes)
    grouped = candidates.exact_pairs(pd.Series(sha[among], dtype=object), cfg.screen.exact_group_pairs)
    ea, eb = among[grouped["idx_a"].to_numpy()], among[grouped["idx_b"].to_numpy()]
    asked = is_query[ea] | is_query[eb]  # (the catalog's own pairs are the batch job's)
    exact = pd.DataFrame({"idx_a": ea[asked], "idx_b": eb[asked],
                          "hash_distance": np.int16(0), "transform": np.int8(0), "kind": "exact"})

    # near: the query's K nearest catalog images and other queries, and catalog images that would
    # take the query into their K nearest. A query with the same bytes as an image before it in
    # path order ("twin") stands behind that image, exactly as a byte copy in the folder does:
    # its pairs are that image's pairs.
    fresh = qvalid & (twin < 0)
    part = old_rep | fresh
    asking = fresh.copy()
    asking[twin[twin >= 0]] = True
    index = candidates.build_index(codes, mask, cfg.screen, representatives=part)
    forward = candidates.directed_neighbours(codes, mask, cfg.screen, representatives=part, index=index,
                                             query_owners=asking)
    reach = candidates.reach_of(codes, mask, cfg.screen, added=asking, owners=old_rep, representatives=part,
                                index=index)
    admitted = reach.iloc[0:0]
    if len(reach):  # (each such owner's K nearest among the catalog's and the query's images, as
        owners = np.zeros(len(rows), bool)  # the batch job's: does it hold the query?)
        owners[reach["owner"].to_numpy()] = True
        lists = candidates.directed_neighbours(codes, mask, cfg.screen, representatives=old_rep, index=index,
                                               query_owners=owners)
        admitted = reach[pd.MultiIndex.from_arrays([reach["owner"].to_numpy(), reach["added"].to_numpy()]).isin(
            pd.MultiIndex.from_arrays([lists["owner_a"].to_numpy(), lists["owner_b"].to_numpy()]))]
    directed = pd.concat([forward, pd.DataFrame({"owner_a": admitted["owner"].to_numpy(np.int64),
                                                 "owner_b": admitted["added"].to_numpy(np.int64),
                                                 "hash_distance": admitted["hash_distance"].to_numpy(np.int16)})],
                         ignore_index=True)
    near = candidates.pairs_from_neighbours(directed, codes, mask, cfg.screen, part)
    # (a group of more than K images with one hash: its first image's pairs outside the group,
    # as the batch job makes them, candidates.tie_bridges; those of the queries' images kept)
    bridges, _ = candidates.tie_bridges(codes, mask, cfg.screen, part)
    bridges = bridges[asking[bridges["idx_a"].to_numpy()] | asking[bridges["idx_b"].to_numpy()]]
    near = candidates.with_pairs(near, bridges)
    near = near[sha[near["idx_a"].to_numpy()] != sha[near["idx_b"].to_numpy()]].assign(kind="near")
    pairs = pd.concat([exact, near], ignore_index=True).astype(
        {"idx_a": "int64", "idx_b": "int64", "hash_distance": "int16", "transform": "int8"})
    for col, dtype in (("orb_matches", "Int32"), ("orb_inliers", "Int32"), ("orb_score", "Float32"),
                       ("orb_status", "object"), ("orb_reason", "object"), ("cosine", "Float32"),
                       ("ssim", "Float32"), ("hist_corr", "Float32")):
        pairs[col] = pd.Series(pd.NA, index=pairs.index, dtype=dtype)

    # verify and confirm by content, reusing the catalog's features and scores
    has_sha = rows["sha256"].notna().to_numpy()
    cids = np.full(len(rows), -1, np.int64)
    cids[has_sha] = catalog.check_content_ids(rows.loc[has_sha, "sha256"])
    # (with each file's bytes and mtime_ns as recorded: the tiers make nothing of a catalog file
    # rewritten since, which --add would file under the sha256 of its old bytes, verify.rewritten_since_screen)
    by_content = rows.loc[part, ["abs_path", "error", "bytes", "mtime_ns"]].set_index(pd.Index(cids[part], dtype=np.int64))
    by_content = by_content[~by_content.index.duplicated(keep="first")]
    sha_of_cid = pd.Series(sha[has_sha], index=cids[has_sha])
    sha_of_cid = sha_of_cid[~sha_of_cid.index.duplicated()]
    new_features: list[pd.DataFrame] = []
    near_idx = pairs.index[pairs["kind"] == "near"]
    from pipeline.run import _set, drop_failed_scores
    if len(near_idx):  # (as a run)
        drop_failed_scores(cat, fps)
    if TIER_ORDER[cfg.tiers] >= TIER_ORDER["verify"] and len(near_idx):
        from pipeline import verify
        sub = pairs.loc[near_idx]
        ia, ib, tt = sub["idx_a"].to_numpy(), sub["idx_b"].to_numpy(), sub["transform"].to_numpy(np.int64)
        hit, found = catalog.lookup_evidence(cat, sha[ia], sha[ib], tt, "orb", fps["orb"])
        for col in catalog.ORB_COLUMNS:
            _set(pairs, near_idx[hit], col, found[col])
        todo = near_idx[~hit]
        if len(todo):
            job = pd.DataFrame({"idx_a": cids[ia[~hit]], "idx_b": cids[ib[~hit]], "transform": tt[~hit]}, index=todo)
            pre, _ = cat.feature_parts("orb", fps["orb_features"],
                                       *verify.needed_features(sha[ia[~hit]], sha[ib[~hit]], tt[~hit]))
            where = cat.feature_root("orb", fps["orb_features"]) if add else tmp / "orb"
            scores = verify.run_verify(job, by_content, cfg, str(where), client=client, progress=progress,
                                       precomputed=pre)
            made = verify.features_made(scores)
            if add:
                new_features.append(catalog.new_feature_rows(cat, "orb", fps["orb_features"], made, sha_of_cid))
            for col in scores.columns:
                _set(pairs, todo, col, scores[col])
    confirmed = None
    if TIER_ORDER[cfg.tiers] >= TIER_ORDER["confirm"]:
        from pipeline import confirm
        routed = decide.needs_confirm(pairs, cfg)
        alive = pairs.index[routed]
        confirmed = routed[pairs.index.get_indexer(near_idx)]
        if len(alive):
            sub = pairs.loc[alive]
            ia, ib, tt = sub["idx_a"].to_numpy(), sub["idx_b"].to_numpy(), sub["transform"].to_numpy(np.int64)
            hit, found = catalog.lookup_evidence(cat, sha[ia], sha[ib], tt, "cosine", fps["embed"])
            _set(pairs, alive[hit], "cosine", found["cosine"])
            todo = alive[~hit]
            if len(todo):
                job = pd.DataFrame({"idx_a": cids[ia[~hit]], "idx_b": cids[ib[~hit]], "transform": tt[~hit]},
                                   index=todo)
                pre, _ = cat.feature_parts("embed", fps["embed"], np.concatenate([sha[ia[~hit]], sha[ib[~hit]]]),
                                           np.concatenate([np.zeros_like(tt[~hit]), tt[~hit]]))
                edir = cat.feature_dir("embed", fps["embed"], f"query-{os.getpid()}-{os.urandom(4).hex()}") \
                    if add else tmp / "embed"
                cos = confirm.run_confirm(job, by_content, cfg, str(edir), client=client, precomputed=pre,
                                          progress=progress)
                if add:
                    new_features.append(catalog.new_feature_rows(cat, "embed", fps["embed"],
                                                                 catalog.parts_summary(edir), sha_of_cid))
                _set(pairs, todo, "cosine", cos.astype("float32"))
    pairs = decide.decide(pairs, cfg)
    # a catalog file compared with a query may have been rewritten or removed since the run that
    # recorded it: its hashes, features and scores are of its old bytes (a query answered
    # "duplicate" of a file that was gone, and the reason said a run had seen it change)
    gone = _changed_since_catalog(old, order, pairs)
    if gone.any():
        pairs = decide.mark_changed(pairs, gone, reason=CHANGED_SINCE_CATALOG)

    if add:
        _add(cat, cfg, fps, old, q, entries, named, pairs, near_idx, confirmed, sha, new_features)

    # one output row per (query, image it was compared with: a catalog image or another query); a
    # near pair of the image a query is a twin of counts for that query too
    ia, ib = pairs["idx_a"].to_numpy(), pairs["idx_b"].to_numpy()
    is_near = (pairs["kind"] == "near").to_numpy()
    sel, qrow, crow = [], [], []
    for side, other in ((ia, ib), (ib, ia)):
        i = np.flatnonzero(is_query[side])
        sel.append(i), qrow.append(side[i]), crow.append(other[i])
    for qi in np.flatnonzero(twin >= 0):
        x = twin[qi]
        for side, other in ((ia, ib), (ib, ia)):
            i = np.flatnonzero((side == x) & is_near)
            sel.append(i), qrow.append(np.full(len(i), qi)), crow.append(other[i])
    sel, qrow, crow = (np.concatenate(x).astype(np.int64) for x in (sel, qrow, crow))
    picked = pairs.iloc[sel]
    # (the paths shown only: a Python string for each of 10M rows is ~1 GB) `query` is each query
    # file as given; `path` the other file as the batch job names it: a catalog file's, and a
    # query file's in the folder (its image_id of that name) or, outside it, as given (no id)
    at = order[crow]
    shown = np.array(rows["path"].take(crow).to_numpy(dtype=object), dtype=object)  # (writable)
    id_names = np.empty(len(crow), dtype=object)
    id_names[at < n_old] = shown[at < n_old]
    for k in np.flatnonzero(at >= n_old):
        j = at[k] - n_old
        shown[k] = named[j] if named[j] is not None else paths.text_form(shown[k])
        id_names[k] = None if rel[j] is None else paths.raw_bytes(rel[j])
    out = pd.DataFrame({
        "query": [paths.text_form(p) for p in rows["path"].take(qrow)], "path": shown,
        "image_id": _ids(id_names, image_ids),
        **{c: picked[c].to_numpy() for c in ["hash_distance", "orb_matches", "orb_inliers", "orb_score", "cosine",
                                             "stage", "is_duplicate", "reason", "rule"]},
        "query_error": pd.Series([None] * len(picked), dtype=object)})
    failed = q[q["error"].notna() | q["codes"].isna()]
    if len(failed):
        out = pd.concat([out, pd.DataFrame({"query": [paths.text_form(p) for p in failed["path"]],
                                            "query_error": failed["error"].to_numpy(dtype=object)})],
                        ignore_index=True)
    # a query image compared with nothing gets a row too: in an --output file it was not told
    # from an image never asked about
    asked = q.loc[~q.index.isin(failed.index), "path"].map(paths.text_form)
    alone = asked[~asked.isin(set(out["query"]))]
    if len(alone):
        out = pd.concat([out, pd.DataFrame({
            "query": alone.to_numpy(dtype=object), "is_duplicate": False, "stage": "screen",
            "reason": f"no candidate: no catalog image within screen.max_distance ({cfg.screen.max_distance}) "
                      "of its hashes, nor the same bytes"})], ignore_index=True)
    out = out.astype({"orb_matches": "Int32", "orb_inliers": "Int32", "orb_score": "Float32", "cosine": "Float32",
                      "hash_distance": "Int16", "image_id": "Int64"})
    dup = out["is_duplicate"].astype(object).where(out["is_duplicate"].notna(), False).to_numpy(dtype=bool)
    ranked = np.lexsort((out["path"].fillna("").to_numpy(dtype=str), ~dup, out["query"].to_numpy(dtype=str)))
    return out.iloc[ranked][OUTPUT_COLUMNS].reset_index(drop=True)


CHANGED_SINCE_CATALOG = ("the catalog file was rewritten or removed since the catalog's run: not decided; "
                         "run the batch job again")


def _changed_since_catalog(old: pd.DataFrame, order: np.ndarray, pairs: pd.DataFrame) -> np.ndarray:
    """Per row (numbered by `order`: a catalog row's is its row of `old`): True for a catalog file
    in a duplicate pair that is gone, or whose size, modification time or ETag is not the one the
    catalog recorded. Only those files are looked at (a query's duplicates name a few; a pair
    called different stays so), a store's concurrently."""
    changed = np.zeros(len(order), bool)
    dup = pairs["is_duplicate"].astype(bool).to_numpy() if len(pairs) else np.zeros(0, bool)
    if not dup.any():
        return changed
    seen = np.unique(np.concatenate([pairs["idx_a"].to_numpy()[dup], pairs["idx_b"].to_numpy()[dup]]))
    seen = seen[order[seen] < len(old)]

    def gone(k: int) -> bool:
        row = old.iloc[int(order[k])]
        path = row["abs_path"]
        try:
            if storage.is_url(path):
                fs, key = storage.filesystem(path)
                size, tag = storage.size_and_tag(fs, key)
                stored = row.get("etag")
                return size != row["bytes"] or (isinstance(stored, str) and tag is not None and tag != stored)
            st = paths.stat(path)
            return st.st_size != row["bytes"] or st.st_mtime_ns != row["mtime_ns"]
        except OSError:
            return True

    if len(seen) > 1 and storage.is_url(old["abs_path"].iloc[0]):
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(min(16, len(seen))) as pool:
            changed[seen] = list(pool.map(gone, seen))
    else:
        changed[seen] = [gone(k) for k in seen]
    return changed


def _ids(names: np.ndarray, image_ids) -> pd.array:
    """image_id per name, text or the exact bytes (names may repeat: several queries can meet one
    catalog image); <NA> for None (a query outside the catalog's folder)."""
    out = pd.array(np.zeros(len(names), np.int64), dtype="Int64")
    known = np.array([n is not None for n in names], bool)
    if known.any():
        raw = [n if isinstance(n, bytes) else n.encode("utf-8") for n in names[known]]
        uniq, inverse = np.unique(np.array(raw, dtype=object), return_inverse=True)
        out[known] = image_ids(list(uniq))[inverse]
    out[~known] = pd.NA
    return out


def _add(cat, cfg, fps, old, q, entries, rel, pairs, near_idx, confirmed, sha, new_features) -> None:
    """--add: the query images become catalog records (`rel`: paths relative to the catalog's
    folder in the catalog's text form, all inside it), with their K-nearest lists, features and
    pair scores. `old`: the catalog's other records."""
    from pipeline.run import representatives
    root = Path(cat.root).resolve()
    added = q.assign(path=rel, etag=None)  # local files: no ETag
    added["abs_path"] = pd.Series([e.abs_path for e in entries], index=added.index, dtype=object)  # (may not be UTF-8)
    images = pd.concat([old.drop(columns=["screen_fp"]), added[catalog.IMAGE_COLUMNS[:-1] + ["abs_path"]]],
                       ignore_index=True).sort_values("path", kind="stable").reset_index(drop=True)
    rep = representatives(images).to_numpy()
    previous = catalog.previous_lists(cat, images, rep, fps, {})
    codes, mask = screen.unpack_codes(images, cfg.screen)
    valid = (images["error"].isna() & images["codes"].notna()).to_numpy()
    mask &= valid[:, None]
    if previous is None:
        directed = candidates.directed_neighbours(codes, mask, cfg.screen, representatives=rep)
    else:
        directed, _ = candidates.incremental_neighbours(codes, mask, cfg.screen, previous[0], previous[1],
                                                        representatives=rep)
    present = set(images["sha256"].dropna())
    scored = pairs.loc[near_idx]
    ev_rows = pd.DataFrame({"sha_a": sha[scored["idx_a"].to_numpy()], "sha_b": sha[scored["idx_b"].to_numpy()],
                            "transform": scored["transform"].to_numpy(np.int64),
                            **{c: scored[c].to_numpy() for c in catalog.ORB_COLUMNS},
                            "cosine": scored["cosine"].to_numpy()})
    verified = TIER_ORDER[cfg.tiers] >= TIER_ORDER["verify"]
    evidence = catalog.EvidenceTable(cat, present, ev_rows, fps, verified, confirmed)
    ran = {}
    features = catalog.features_table(cat, present, new_features, ran)
    cat.commit(root=str(root), run_id=cat.manifest.get("run_id", ""), fps={"screen": fps["screen"],
               "neighbours": fps["neighbours"]}, images=catalog.images_table(images, fps),
               neighbours=catalog.neighbours_table(directed, images), evidence=evidence, features=features,
               config=cat.manifest.get("config"))
    log.info("added %d image(s) to the catalog %s", len(rel), cat.directory)


def write_result(result: pd.DataFrame, output: str | Path) -> None:
    """Parquet, CSV or JSON by the file's extension (written atomically)."""
    from pipeline.write import _atomic
    path = Path(output)
    ext = path.suffix.lower()
    if ext == ".parquet":
        _atomic(path, lambda tmp: result.to_parquet(tmp, index=False))
    elif ext == ".csv":
        _atomic(path, lambda tmp: result.to_csv(tmp, index=False))
    elif ext == ".json":
        _atomic(path, lambda tmp: result.to_json(tmp, orient="records", indent=1))
    else:
        raise ConfigError(f"--output {str(output)!r}: the extension must be .parquet, .csv or .json")


def format_table(result: pd.DataFrame) -> str:
    """A terminal table: per query, its duplicates (then the other compared images)."""
    if result.empty:
        return "no catalog image is a candidate for the query image(s)"
    shown = result[["query", "path", "is_duplicate", "rule", "hash_distance", "orb_inliers", "cosine",
                    "query_error"]].copy()
    if shown["query_error"].isna().all():
        shown = shown.drop(columns="query_error")
    shown["cosine"] = shown["cosine"].map(lambda x: "" if pd.isna(x) else f"{x:.3f}")
    return shown.astype(object).where(shown.notna(), "").to_string(index=False)
