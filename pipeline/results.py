"""Results API: a finished run's outputs as pandas frames, for analysts and for `dedupe plan`.

    >>> from pipeline.results import load_run
    >>> run = load_run("out")                       # the --out folder of a finished run
    >>> run.images, run.pairs, run.manifest         # images.parquet, pairs.parquet, run.json
    >>> members = run.clusters(keep="largest_pixels")
    >>> members[members.keeper]                     # one suggested keeper per cluster
    >>> run.pairs[run.pairs.rule == "verify_orb_accept"]
    >>> run.implied_pairs()                         # every pair the clusters imply

`pairs` always has a `rule` column: the machine-readable code of the decision rule that decided
the pair (`RULE_CODES`). Outputs written before pairs.parquet carried it get it derived from
`stage`, `is_duplicate` and the human `reason`.

Keeper policies (`KEEP_POLICIES`, or a callable): which member of a cluster to keep. Ties always
fall back to the next key and finally to the path, so the choice is deterministic.

- largest_pixels: most pixels, then the largest file;
- largest_file: most bytes, then most pixels;
- oldest / newest: by modification time;
- shortest_path: fewest characters in the path (e.g. `photo.jpg` over `backup/old/photo (1).jpg`);
- preferred_folder: the first member under the first matching prefix of `prefer` (paths relative
  to the scanned folder, or absolute), then largest_pixels;
- a callable `f(members) -> image_id`, called once per cluster with that cluster's member rows.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Union

import numpy as np
import pandas as pd

from pipeline.decide import RULES
from pipeline.config import KEEP_POLICIES

Keep = Union[str, Callable[[pd.DataFrame], int]]

# rule code -> meaning (the same codes as pairs.parquet's `rule` column)
RULE_CODES = RULES  # the decision rule's codes (pipeline/decide.py), one list for the whole project


def derive_rule(pairs: pd.DataFrame) -> pd.Series:
    """The `rule` code of each pair from `stage`, `is_duplicate` and `reason` (the texts written by
    pipeline/decide.py), for outputs that have no `rule` column."""
    stage = pairs["stage"].astype(str).to_numpy()
    dup = pairs["is_duplicate"].astype(bool).to_numpy()
    reason = pairs["reason"].astype(object).fillna("").astype(str)
    rule = np.full(len(pairs), "", dtype=object)
    rule[stage == "exact"] = "exact_bytes"
    screen = stage == "screen"
    rule[screen] = np.where(dup[screen], "screen_hash_close", "screen_hash_far")
    confirm = stage == "confirm"
    with_orb = reason.str.match(r"duplicate: cosine \S+ >= \S+ with \d+ ORB inliers").to_numpy()
    rule[confirm] = np.where(~dup[confirm], "confirm_cosine_low",
                             np.where(with_orb[confirm], "confirm_cosine_orb", "confirm_cosine"))
    verify = stage == "verify"
    no_embedding = reason.str.endswith("; no embedding").to_numpy()
    accepted = reason.str.startswith("duplicate: orb").to_numpy()
    disagrees = reason.str.contains("(geometry disagrees)", regex=False).to_numpy()
    fallback = reason.str.contains("; hash distance ", regex=False).to_numpy()
    rule[verify] = "verify_orb_match"  # tiers=verify, ORB "match": the reason is just the counts
    rule[verify & fallback] = np.where(dup[verify & fallback], "verify_inconclusive_hash_close",
                                       "verify_inconclusive_hash_far")
    rule[verify & accepted] = "verify_orb_accept"
    rule[verify & disagrees] = "verify_orb_reject"
    rule[verify & no_embedding] = "confirm_no_embedding"
    # (the pixel check's pairs, and pairs of a file that changed during the run, at any stage:
    # they were "verify_orb_match" and "exact_bytes", a duplicate's code for a rejected pair)
    pixel = reason.str.contains(": pixel check SSIM ", regex=False).to_numpy()
    rule[pixel] = np.where(dup[pixel], "verify_pixel_match", "verify_pixel_mismatch")
    rule[reason.str.startswith("a file changed during the run").to_numpy()] = "file_changed"
    return pd.Series(pd.Categorical(rule, categories=list(RULE_CODES)), index=pairs.index, name="rule")


def _in_folder(paths: pd.Series, prefix: str) -> np.ndarray:
    prefix = prefix.rstrip("/\\")
    return (paths == prefix).to_numpy() | paths.str.startswith(prefix + "/").to_numpy() | \
        paths.str.startswith(prefix + os.sep).to_numpy()


def keeper_ids(members: pd.DataFrame, keep: Keep = "largest_pixels", prefer: Iterable[str] = ()) -> pd.Series:
    """cluster_id -> image_id of the member to keep. `members`: cluster_id, image_id, path,
    abs_path, bytes, width, height, mtime (as `Run.clusters` gives them)."""
    if isinstance(prefer, str):  # (a string is a list of its letters: "sub" matched no folder, unsaid)
        prefer = [prefer]
    if callable(keep):
        # (the function gets one cluster's rows, its cluster_id column too; what it returns must be
        # one of them: an id from elsewhere left the cluster without a keeper, unsaid)
        def chosen(group: pd.DataFrame) -> int:
            picked = int(keep(group))
            if picked not in set(group["image_id"].astype("int64")):
                raise ValueError(f"keep function returned {picked}, not the image_id of a member of cluster "
                                 f"{int(group['cluster_id'].iloc[0])}")
            return picked
        return members.groupby("cluster_id", sort=False)[list(members.columns)].apply(chosen)
    if keep not in KEEP_POLICIES:
        raise ValueError(f"unknown keep policy {keep!r}: use one of {', '.join(KEEP_POLICIES)} or a callable")
    m = pd.DataFrame({
        "cluster_id": members["cluster_id"].to_numpy(), "image_id": members["image_id"].to_numpy(),
        "path": members["path"].astype(str).to_numpy(),
        "pixels": -(members["width"].astype("Float64").fillna(0) * members["height"].astype("Float64")
                    .fillna(0)).to_numpy(dtype=np.float64),
        "bytes": -members["bytes"].astype("Float64").fillna(0).to_numpy(dtype=np.float64),
        "mtime": pd.to_datetime(members["mtime"], utc=True).astype("int64").to_numpy(),
        "length": members["path"].astype(str).str.len().to_numpy(),
    })
    keys = {"largest_pixels": ["pixels", "bytes"], "largest_file": ["bytes", "pixels"],
            "oldest": ["mtime"], "shortest_path": ["length"], "preferred_folder": ["rank", "pixels", "bytes"]}
    if keep == "newest":
        m["mtime"] = -m["mtime"]
        order = ["mtime"]
    else:
        order = keys[keep]
    if keep == "preferred_folder":
        prefer = list(prefer)
        if not prefer:
            raise ValueError("keep='preferred_folder' needs prefer=[folder, ...] (paths relative to the scanned folder)")
        rank = np.full(len(m), len(prefer))
        for i, prefix in reversed(list(enumerate(prefer))):
            rank[_in_preferred(members, prefix)] = i
        m["rank"] = rank
    first = m.sort_values([*order, "path"], kind="stable").drop_duplicates("cluster_id")
    return pd.Series(first["image_id"].to_numpy(), index=first["cluster_id"].to_numpy(), name="keeper")


def _in_preferred(images: pd.DataFrame, prefix: str) -> np.ndarray:
    """Which of `images` lie in the preferred folder `prefix`: relative to DATA (`path`), or
    absolute, a URL included (`abs_path`)."""
    from pipeline import storage
    col = "abs_path" if os.path.isabs(prefix) or storage.is_url(prefix) else "path"
    return _in_folder(images[col].astype(str).reset_index(drop=True), prefix)


def unmatched_folders(images: pd.DataFrame, prefer: Iterable[str]) -> list[str]:
    """The `prefer` folders (as keeper_ids matches them) that hold none of `images`: most likely
    a typo, which would leave every cluster to the fallback order without a word."""
    return [prefix for prefix in prefer if not _in_preferred(images, prefix).any()]


def normalize_images(images: pd.DataFrame, root: str | None = None) -> pd.DataFrame:
    """Images as the pipeline gives them (in memory: cluster_id -1 for singletons, mtime in
    seconds) or as images.parquet stores them -> cluster_id nullable Int64, mtime UTC timestamps,
    abs_path (from `root` when missing), pixels."""
    out = images.copy()
    cid = out["cluster_id"].astype("Int64")  # exact for int64 (63-bit ids do not fit a float64)
    out["cluster_id"] = cid.where(cid >= 0)  # in memory, -1 marks a singleton
    if not pd.api.types.is_datetime64_any_dtype(out["mtime"]):
        # to the microsecond, as images.parquet keeps it: the same `oldest`/`newest` keeper from the
        # run's own frame as from the file (two mtimes within a microsecond were a tie in one, not
        # the other, and the run's report named another keeper than `dedupe plan`)
        from pipeline.write import utc_mtimes
        out["mtime"] = utc_mtimes(out)
    if "abs_path" not in out:
        from pipeline import storage  # (a store's root: the objects' URLs; a Path would fold the "//")
        out["abs_path"] = pd.Series([storage.join(root or ".", p) for p in out["path"]], index=out.index,
                                    dtype=out["path"].dtype)  # (text even with no rows: it was float64)
    out["pixels"] = (out["width"].astype("Float64") * out["height"].astype("Float64")).astype("Int64")
    return out


@dataclass
class Run:
    """One finished run: `images`, `pairs` (with `rule`), `manifest` (run.json), `out_dir` (a
    folder, or the URL of OUT on a store)."""
    out_dir: Path | str
    images: pd.DataFrame
    pairs: pd.DataFrame
    manifest: dict

    @property
    def root(self) -> Path | str:
        """The scanned folder (absolute, as recorded in run.json), or its URL on a store."""
        from pipeline import storage
        root = self.manifest["root"]
        return root if storage.is_url(root) else Path(root)

    def duplicates(self) -> pd.DataFrame:
        """Pairs decided as duplicates."""
        return self.pairs[self.pairs["is_duplicate"].astype(bool)]

    def clusters(self, keep: Keep = "largest_pixels", prefer: Iterable[str] = ()) -> pd.DataFrame:
        """One row per image in a cluster: cluster_id, cluster_size, image_id, path, abs_path,
        bytes, width, height, pixels, format, mtime, sha256, raw_path (the exact bytes of a name
        that is not UTF-8; when the run's images have the column) and `keeper` (True for the member
        the `keep` policy keeps). Largest clusters first, members by path.

            >>> members = run.clusters(keep="preferred_folder", prefer=["originals"])
            >>> members.groupby("cluster_id").size().describe()
        """
        m = self.images[self.images["cluster_id"].notna()].copy()
        m["cluster_size"] = m.groupby("cluster_id")["image_id"].transform("size")
        m = m.sort_values(["cluster_size", "cluster_id", "path"], ascending=[False, True, True], kind="stable")
        cols = ["cluster_id", "cluster_size", "image_id", "path", "abs_path", "bytes", "width", "height",
                "pixels", "format", "mtime", "sha256", *(["raw_path"] if "raw_path" in m else [])]
        m = m[cols].reset_index(drop=True)
        kept = keeper_ids(m, keep, prefer) if len(m) else pd.Series(dtype="int64")
        m["keeper"] = m["image_id"].to_numpy() == kept.reindex(m["cluster_id"].to_numpy()).to_numpy()
        return m

    def implied_pairs(self, max_pairs: int = 10_000_000) -> pd.DataFrame:
        """Every pair of images in one cluster: cluster_id, image_id_a, path_a, image_id_b, path_b
        (a before b in path order, as pairs.parquet orders them) and `in_pairs` (True where
        pairs.parquet holds the pair's evidence; the rest is implied by the clusters'
        transitivity: the file lists at most K edges per image, never every pair). A cluster of n
        images has n(n-1)/2 pairs: more than `max_pairs` in all raises ValueError, naming the
        largest cluster, before anything is made.

            >>> everything = run.implied_pairs()
            >>> everything[~everything.in_pairs]           # pairs only the clusters imply
        """
        m = self.images[self.images["cluster_id"].notna()]
        m = m.sort_values(["cluster_id", "path"], kind="stable")
        sizes = m.groupby("cluster_id", sort=False)["image_id"].size()
        total = int((sizes * (sizes - 1) // 2).sum())
        if total > max_pairs:
            raise ValueError(f"the clusters imply {total:,} pairs, above max_pairs={max_pairs:,} (the largest "
                             f"cluster, {sizes.idxmax()}, has {int(sizes.max()):,} images): raise max_pairs, or "
                             "expand the clusters you need from run.clusters()")
        ids, paths_, cids = (m[c].to_numpy() for c in ("image_id", "path", "cluster_id"))
        starts = np.concatenate([[0], np.cumsum(sizes.to_numpy())])
        a, b = [], []
        for start, end in zip(starts[:-1], starts[1:]):
            i, j = np.triu_indices(int(end - start), k=1)
            a.append(i + start)
            b.append(j + start)
        a = np.concatenate(a) if a else np.zeros(0, np.int64)
        b = np.concatenate(b) if b else np.zeros(0, np.int64)
        # (the dtypes of clusters() and images.parquet, with rows or none: cluster_id was int64 here
        # and Int64 there, the paths object when empty)
        out = pd.DataFrame({"cluster_id": pd.array(cids[a], dtype="Int64"), "image_id_a": ids[a],
                            "path_a": pd.array(paths_[a], dtype=m["path"].dtype),
                            "image_id_b": ids[b], "path_b": pd.array(paths_[b], dtype=m["path"].dtype)})
        listed = pd.MultiIndex.from_arrays([self.pairs["path_a"], self.pairs["path_b"]])
        out["in_pairs"] = pd.MultiIndex.from_arrays([out["path_a"], out["path_b"]]).isin(listed)
        return out


def load_run(out_dir: str | Path, storage_options: dict | None = None) -> Run:
    """Read OUT/images.parquet, OUT/pairs.parquet and OUT/run.json of a finished run. OUT may be
    a URL on a store (s3://bucket/out, gs://..., az://...): the files are read from the generation
    `OUT/.dedupe/current` names, so the three come from one run even while another run publishes.
    `storage_options`: the store's filesystem options, as `storage.options` in a run's config
    (default: those this process was configured with, else none: the environment's credentials).

        >>> run = load_run("out")
        >>> run = load_run("s3://bucket/out")
        >>> run.pairs.groupby("rule").size()
    """
    from pipeline import storage
    out_dir = storage.local_form(out_dir)
    if storage.is_url(out_dir):
        out_dir = str(out_dir).rstrip("/")
        manifest, images, pairs = storage.read_outputs(out_dir, storage_options)
    else:
        from pipeline import outdir
        out_dir = Path(out_dir)
        # the three files from the generation `current` names now, resolved once: through OUT's
        # own links each file was found anew, and a run publishing meanwhile gave one file from
        # each run (4 of 4,631 loads while 12 runs published)
        where = outdir.current_generation(out_dir) or out_dir
        manifest_path = where / "run.json"
        if not manifest_path.is_file():  # run.json is written last: without it the run is incomplete
            raise FileNotFoundError(f"{out_dir / 'run.json'} not found: {out_dir} is not the output folder of a "
                                    "finished run")
        # (what cannot be read is named, with what to do: a traceback, or the bare path, said neither)
        from pipeline.config import ConfigError
        damaged = f"{out_dir} is not the output folder of a finished run, or it is damaged: run the job again"
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{out_dir / 'run.json'} cannot be read ({exc}): {damaged}") from None
        if not isinstance(manifest, dict) or "root" not in manifest:
            raise ConfigError(f"{out_dir / 'run.json'} is not a dedupe run.json: {damaged}")
        frames = []
        for name in ("images.parquet", "pairs.parquet"):
            try:
                frames.append(pd.read_parquet(where / name))
            except (OSError, ValueError) as exc:
                raise ConfigError(f"{out_dir / name} cannot be read ({exc}): {damaged}") from None
        images, pairs = frames
    images = normalize_images(images, manifest.get("root"))
    if "rule" not in pairs:
        pairs["rule"] = derive_rule(pairs)
    return Run(out_dir=out_dir, images=images, pairs=pairs, manifest=manifest)
