"""The review report: OUT/report/index.html, its data file, thumbnails and pair drawings.

Layout (everything relative, so the folder opens from disk, `file://`, with no network):

    OUT/report.html                 small page that sends the browser to report/index.html
    OUT/report/index.html           summary (rendered here, jinja2 autoescape) + the app
    OUT/report/data.js              `window.DEDUPE_REPORT = {...}`: the report.max_clusters largest
                                    clusters with the pairs that link their members
                                    (`cluster_links`), the closest rejected pairs, the first
                                    report.max_errors errors
    OUT/report/app.js, style.css    the app (plain JS): pages, search, filters, pair view
    OUT/report/thumbs/<image_id>.jpg    one per image shown, made once (a rebuild, and the next
                                        run's report, link those of unchanged files: thumbs.json
                                        records each one's sha256, size and code,
                                        `_thumb_code`); in a run, taken from the
                                        verify tier's feature rows when it decoded the image
                                        (`thumbs_from_store`), else decoded (`make_thumb`)
    OUT/report/pairs/<id_a>-<id_b>.jpg  ORB matches drawn for `report.draw_pairs` duplicate pairs
                                        (one per cluster in page order, then a second, ...) and the
                                        `report.draw_rejected` closest rejected pairs (reused
                                        likewise: drawings.json)

The data is a script that sets a global rather than JSON read with fetch(): browsers refuse
fetch() on file:// pages. It is JSON with `<`, `>`, `&` and the two JavaScript line separators
escaped, so no path can end the script or inject markup; the app builds the page with
textContent, never innerHTML, for anything from the data.

Closeness of a rejected pair (how the "closest rejected" list is ranked): pairs that reached the
confirm tier come first, by cosine (high first); then pairs the verify tier decided, by ORB
inliers (more first); then pairs decided on the hash alone, by hash distance (small first). Each
tier only sees pairs the one before could not settle, so a later tier's pair is the closer call.
A cluster's pairs are ranked the same way, its byte copies (stage `exact`) before all of them.
"""
from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import os
import shutil
import uuid
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import jinja2
import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from pipeline import paths
from pipeline.config import Config, ConfigError, ReportConfig, config_from_dict
from pipeline.decode import load_image
from pipeline.progress import completed
from pipeline.results import RULE_CODES, derive_rule, keeper_ids, normalize_images

if TYPE_CHECKING:
    from pipeline import storage

log = logging.getLogger("pipeline")
STATIC = ("app.js", "style.css")
THUMB_INDEX = "thumbs.json"  # image_id -> "sha256:thumb_size:code" of each thumbnail made
DRAW_INDEX = "drawings.json"  # drawing name -> "sha256_a:sha256_b:settings:matches:inliers" of each pair drawn
DRAW_HEIGHT = 320  # each image's height in a pair drawing (pixels)
DRAW_MAX_RATIO = 4  # and its width at most this times DRAW_HEIGHT
INLIER, OUTLIER = (40, 200, 70), (235, 60, 50)
THUMBS_PER_TASK = 64  # thumbnails decoded per task (those taken from feature parts: one task per part)
DRAWINGS_PER_TASK = 8  # pair drawings per task (their feature rows read once per part and task)


def _env() -> jinja2.Environment:
    return jinja2.Environment(loader=jinja2.PackageLoader("pipeline", "templates"),
                              autoescape=True, undefined=jinja2.StrictUndefined)


def _static(name: str) -> bytes:
    return (resources.files("pipeline") / "templates" / name).read_bytes()


JSON_ROWS = 4096  # rows of a long list turned into JSON text at a time (iter_script_json)
# the image columns the report reads (build_data, keeper_ids, the thumbnails): write_report keeps
# these only, so its copies of the listed images' rows carry no other column
IMAGE_COLUMNS = ("image_id", "path", "abs_path", "sha256", "bytes", "mtime", "mtime_ns", "width", "height", "format", "error",
                 "cluster_id", "raw_path")
# the pair columns the report reads (build_data, shown_pairs): a run hands it these only
PAIR_COLUMNS = ("image_id_a", "image_id_b", "hash_distance", "orb_matches", "orb_inliers", "orb_score", "cosine",
                "stage", "is_duplicate", "reason", "rule")


def _safe(text: str) -> str:
    for ch, esc in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
                    ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(ch, esc)
    return text


def _dumps(value) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def iter_script_json(data, rows: int = JSON_ROWS) -> Iterator[str]:
    """`script_json(data)` in pieces: a dict key by key, a list longer than `rows` that many
    items at a time. data.js is written from these, so the driver never holds the whole text
    (at 100k images its pairs alone are tens of MB, and each escape made another copy)."""
    if isinstance(data, dict):
        yield "{"
        for i, (key, value) in enumerate(data.items()):
            yield ("," if i else "") + _safe(_dumps({key: 0})[1:-3]) + ":"  # (json's own key rules)
            yield from iter_script_json(value, rows)
        yield "}"
    elif isinstance(data, Rows) or (isinstance(data, list) and len(data) > rows):
        yield "["
        for start in range(0, len(data), rows):
            part = data.rows(start, start + rows) if isinstance(data, Rows) else data[start:start + rows]
            yield ("," if start else "") + _safe(_dumps(part)[1:-1])
        yield "]"
    else:
        yield _safe(_dumps(data))


def script_json(data) -> str:
    """JSON that is safe inside a <script> (in a page or a .js file): no `</`, no markup."""
    return "".join(iter_script_json(data))


class Rows:
    """A long list of data.js rows kept as columns: each row is made as a list when it is read,
    and data.js reads them JSON_ROWS at a time (`iter_script_json`). Held as lists of Python
    values, a row was ~0.25 kB (a pair's) to ~0.45 kB (an image's), and a 100k-file run's report
    lists ~98k of each through the write stage.

    `columns`: name -> (values, to_json), in row order; `values` is any array that slices
    (a pandas or numpy array) and `to_json` turns a slice of it into a list of JSON values. A
    column's values can be set in place (`values(name)[i] = ...`), as the report marks the drawn
    pairs and the images with a thumbnail. Reads and compares like a list of lists."""

    def __init__(self, n: int, **columns: tuple):
        self.n, self.columns = n, dict(columns)

    def values(self, name: str):
        return self.columns[name][0]

    def add(self, name: str, values, to_json=None) -> None:
        self.columns[name] = (values, to_json or _plain)

    def rows(self, start: int, stop: int) -> list[list]:
        stop = min(stop, self.n)
        cols = [to_json(values[start:stop]) for values, to_json in self.columns.values()]
        return [list(r) for r in zip(*cols)] if cols else [[] for _ in range(start, stop)]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(self.n))]
        if not -self.n <= i < self.n:
            raise IndexError(i)
        i %= self.n
        return self.rows(i, i + 1)[0]

    def __iter__(self) -> Iterator[list]:
        for start in range(0, self.n, JSON_ROWS):
            yield from self.rows(start, start + JSON_ROWS)

    def __eq__(self, other) -> bool:
        return isinstance(other, (list, Rows)) and len(self) == len(other) and list(self) == list(other)


def _root_named(root: str | None) -> bool:
    """Whether the scanned folder's text in the outputs is its name, for the report's links: a
    local folder's text has `\\xNN` escapes where its name is not UTF-8, or where a valid name holds
    such text (then the folder by that text exists here). URLs are text."""
    if not root or "://" in root or "\\x" not in root:
        return bool(root)
    return os.path.isdir(root)


def _plain(values) -> list:  # numpy numbers and bools as Python's; object arrays as they are
    return values.tolist() if isinstance(values, np.ndarray) else list(values)


def _texts(values) -> list:
    return [v if isinstance(v, str) else None for v in values]


def _distinct_texts(values, text) -> np.ndarray:
    """`text(v)` of each value, as an object array holding one string per distinct value (made
    once per distinct value, not per row)."""
    codes, uniques = pd.factorize(values, use_na_sentinel=False)
    return np.array([text(u) for u in uniques], dtype=object).take(codes) if len(codes) else np.array([], dtype=object)


def _numbers(digits: int | None = None):
    return lambda values: [_num(v, digits) for v in values]


def closeness_order(pairs: pd.DataFrame) -> np.ndarray:
    """Positions of `pairs`, closest first (see the module docstring)."""
    cos = pairs["cosine"].astype("Float64").to_numpy(dtype=np.float64, na_value=np.nan)
    inl = pairs["orb_inliers"].astype("Float64").to_numpy(dtype=np.float64, na_value=np.nan)
    dist = pairs["hash_distance"].astype("Float64").to_numpy(dtype=np.float64, na_value=np.inf)
    tier = np.where(~np.isnan(cos), 0, np.where(~np.isnan(inl), 1, 2))
    if "stage" in pairs:  # byte copies first: no tier looked at them, and none is closer
        tier[(pairs["stage"] == "exact").to_numpy(dtype=bool, na_value=False)] = -1
    # lexsort: last key first
    return np.lexsort((dist, -np.nan_to_num(inl, nan=-1), -np.nan_to_num(cos, nan=-2), tier))


def closeness_by(pairs: pd.DataFrame) -> np.ndarray:
    """Which evidence ranks each pair's closeness: cosine, ORB inliers or hash distance."""
    has_cos = pairs["cosine"].notna().to_numpy()
    has_inl = pairs["orb_inliers"].notna().to_numpy()
    return np.where(has_cos, "cosine", np.where(has_inl, "ORB inliers", "hash distance"))


def _report_config(manifest: dict) -> tuple[Config, ReportConfig]:
    try:
        cfg = config_from_dict(manifest.get("config") or {})
    except ConfigError as exc:  # outputs of another version: draw with the defaults
        log.warning("report: run.json config not understood (%s); using defaults", exc)
        cfg = Config()
    return cfg, cfg.report


# ------------------------------------------------------------------------------------------------
# Pixels


def thumb_jpeg(img: Image.Image, size: int, reducing_gap: float = 2.0) -> bytes:
    """The report's thumbnail of decoded pixels (shrunk in place): longer side at most `size`,
    JPEG quality 80."""
    img.thumbnail((size, size), Image.Resampling.LANCZOS, reducing_gap=reducing_gap)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=80)
    return buf.getvalue()


def thumb_from_decoded(img: Image.Image, full_size: tuple[int, int] | None, size: int) -> bytes:
    """The thumbnail `make_thumb` would make, from a picture another tier already decoded and
    scaled (the verify tier's, longer side verify.max_side), so the report need not decode the
    file again. b"" when that picture cannot stand in for the file: its size unknown, the image
    smaller than `size` (make_thumb keeps its own size; the scaled picture may have been
    enlarged) or the picture smaller than `size`. A box reduction by 2 first (reducing_gap 1:
    384 -> 192 -> 160) halves the cost of LANCZOS from 384 px, no further from make_thumb's
    pixels than the plain LANCZOS (measured: mean difference 4.5 vs 4.4 levels per pixel)."""
    if full_size is None or max(full_size) < size or max(img.size) < size:
        return b""
    return thumb_jpeg(img.copy(), size, reducing_gap=1.0)


def make_thumb(abs_path: str, size: int) -> bytes:
    """A JPEG thumbnail (longer side `size`) decoded at reduced scale; b"" when undecodable."""
    try:
        img, _, _ = load_image(abs_path, min_side=size)
        return thumb_jpeg(img, size)
    except Exception:  # a thumbnail is a nicety: a hostile file must not fail the run
        return b""


def make_thumbs(wanted: list[tuple[int, str]], size: int) -> dict[int, bytes]:
    """`make_thumb` of each (name, abs_path): name -> JPEG bytes (b"" when undecodable). Names
    are the caller's (write_report's: the image's position in the report's rows)."""
    return {name: make_thumb(abs_path, size) for name, abs_path in wanted}


def thumbs_from_store(part_path: str, wanted: list[tuple[int, int, str]], size: int,
                      check: str | None = None) -> dict[int, bytes]:
    """Thumbnails the verify tier made while it had the images decoded (feature-store columns
    `report_thumb`, `report_thumb_size`): `wanted` lists (name, key, abs_path) of one part. A
    row without one of this `size` (made with another report.thumb_size, before the column
    existed, or not at all) falls back to `make_thumb`. `check`: the bytes and sha256 a catalog
    lists for the part (`store.read_columns`). Returns name -> JPEG bytes (b"" when none could
    be made)."""
    from pipeline import store
    try:
        found = store.read_columns(part_path, [w[1] for w in wanted], ["report_thumb", "report_thumb_size"],
                                   check=check)
    except Exception as exc:  # an unreadable or changed part: decode instead, as without it
        log.warning("report thumbnails: %s; the images are decoded instead", exc)
        found = pd.DataFrame()
    made = {}
    for name, key, abs_path in wanted:
        data = found.at[key, "report_thumb"] if key in found.index else None
        if isinstance(data, bytes) and data and found.at[key, "report_thumb_size"] == size:
            made[name] = data
        else:
            made[name] = make_thumb(abs_path, size)
    return made

FEATURE_COLUMNS = ["n_keypoints", "keypoints", "descriptors", "width", "height", "error"]


def _stored_rows(part_path: str, keys: list[int], method: str, check: str | None = None) -> dict[int, dict]:
    """The verify tier's feature rows for `keys` of one part, as feature dicts (`verify._unpack`);
    {} when the part cannot be read or is not what `check` says (the drawing then computes its
    features)."""
    from pipeline import store, verify
    try:
        found = store.read_columns(part_path, keys, FEATURE_COLUMNS, check=check)
    except Exception as exc:
        log.warning("report drawings: %s; their features are computed again", exc)
        return {}
    return {int(k): verify._unpack(row, method) for k, row in zip(found.index, found.to_dict("records"))
            if not (isinstance(row["error"], str) or pd.isna(row["n_keypoints"]))}


def _draw_sources(where: pd.DataFrame, sha_a, sha_b) -> tuple[dict, dict] | None:
    """Each image's feature rows at hand, {transform: (part, key)} (0 plain, 4 mirrored): the
    rows the verify tier matched for this pair are among them; None when an image has none."""
    if sha_a not in where.index or sha_b not in where.index:
        return None
    out = []
    for r in (where.loc[sha_a], where.loc[sha_b]):
        rows = {int(r["key"]) % 8: (r["part_path"], int(r["key"]))}
        if pd.notna(r["mirrored_key"]):
            rows[4] = (r["mirrored_part_path"], int(r["mirrored_key"]))
        out.append(rows)
    return out[0], out[1]


def draw_pair(abs_a: str, abs_b: str, cfg: Config, height: int = DRAW_HEIGHT,
              stored: tuple[dict, dict] | None = None,
              expect: tuple[int, int] | None = None) -> tuple[bytes, dict] | None:
    """The two images side by side with the ORB matches as lines (inliers green, outliers red), as
    (JPEG bytes, {matches, inliers, mirrored}): from the verify tier's own feature rows when
    `stored` gives them (each image's by transform: `verify.stored_evidence`), else recomputed
    with its code (`verify.pair_evidence`); either tries each orientation for `expect`, the
    run's orb_matches and orb_inliers. None when undecodable, and when the
    matches found are not the run's numbers (a drawing beside numbers it does not show would
    mislead: e.g. 34 green inlier lines on a pair the table says has 16)."""
    from pipeline import verify  # OpenCV only when drawing
    try:
        ev = verify.stored_evidence(stored[0], stored[1], cfg, expect=expect) if stored \
            else verify.pair_evidence(abs_a, abs_b, cfg, expect=expect)
        if expect is not None and (ev["matches"], ev["inliers"]) != tuple(expect):
            return None
        shown = []
        for path in (abs_a, abs_b):
            img, _, _ = load_image(path, min_side=height, max_pixels=cfg.screen.max_pixels,
                                  max_decode_bytes=cfg.screen.max_decode_bytes)
            # `height` tall, or less for a banner wider than DRAW_MAX_RATIO x that (a 20000 x 60
            # image was a 100k-pixel-wide canvas, past what JPEG holds: the run failed)
            fit = min(height / img.height, DRAW_MAX_RATIO * height / img.width)
            shown.append(img.resize((max(1, round(img.width * fit)), max(1, round(img.height * fit))),
                                    Image.Resampling.BILINEAR))
        gap = 12
        canvas = Image.new("RGB", (shown[0].width + gap + shown[1].width, height), (255, 255, 255))
        canvas.paste(shown[0], (0, 0))
        canvas.paste(shown[1], (shown[0].width + gap, 0))
        sa = np.array([shown[0].width / ev["size_a"][0], shown[0].height / ev["size_a"][1]])
        sb = np.array([shown[1].width / ev["size_b"][0], shown[1].height / ev["size_b"][1]])
        pa = ev["keypoints_a"] * sa
        pb = ev["keypoints_b"] * sb + np.array([shown[0].width + gap, 0])
        draw = ImageDraw.Draw(canvas)
        for want in (False, True):  # outliers first, inliers on top
            colour = INLIER if want else OUTLIER
            for (xa, ya), (xb, yb) in zip(pa[ev["inlier"] == want], pb[ev["inlier"] == want]):
                draw.line([(xa, ya), (xb, yb)], fill=colour, width=1)
                for x, y in ((xa, ya), (xb, yb)):
                    draw.ellipse([x - 2, y - 2, x + 2, y + 2], outline=colour)
        buf = io.BytesIO()
        canvas.save(buf, "JPEG", quality=82)
    except Exception:  # (DecodeError, cv2.error on a 1-pixel sliver, ...): no drawing, never a failed run
        return None
    return buf.getvalue(), {"matches": ev["matches"], "inliers": ev["inliers"], "mirrored": ev["mirrored"]}


def draw_pairs(todo: list[tuple[str, str, str, tuple[dict, dict] | None, tuple]], cfg: Config,
               checks: dict[str, str] | None = None) -> dict[str, tuple[bytes, dict] | None]:
    """`draw_pair` of each (name, abs_a, abs_b, sources, run_numbers): `sources` each image's
    feature rows {transform: (part, key)} (`_draw_sources`; None: none stored, ORB recomputed),
    read once per part for the whole list (checked against `checks`, part -> its catalog's
    "<bytes>:<sha256>", when it has one); `run_numbers` the verify tier's orb_matches,
    orb_inliers. Returns name -> draw_pair's result."""
    want: dict[str, set[int]] = {}
    for *_, src, _numbers in todo:
        for part, key in [*src[0].values(), *src[1].values()] if src else []:
            want.setdefault(part, set()).add(key)
    rows: dict[int, dict] = {}
    for part, keys in want.items():
        rows.update(_stored_rows(part, sorted(keys), cfg.verify.method, (checks or {}).get(part)))
    out = {}
    for name, abs_a, abs_b, src, numbers in todo:
        fas, fbs = ({t: rows[key] for t, (_, key) in side.items() if key in rows} for side in src or ({}, {}))
        # (the run's numbers, when it has both: a pair decided before the verify tier has none)
        expect = tuple(int(n) for n in numbers) if all(isinstance(n, (int, np.integer)) for n in numbers) else None
        stored = (fas, fbs) if (0 in fas and fbs) or (0 in fbs and 4 in fas) else None
        out[name] = draw_pair(abs_a, abs_b, cfg, stored=stored, expect=expect)
    return out


def _parts_of(item: tuple) -> list[str]:
    """The feature parts a `draw_pairs` item reads (its sources'), sorted."""
    src = item[3]
    return sorted({part for side in src or () for part, _ in side.values()})


def drawing_tasks(todo: list[tuple], checks: dict[str, str]) -> list[tuple[list[tuple], dict[str, str]]]:
    """`todo` (draw_pairs items) cut into tasks of DRAWINGS_PER_TASK, each with the checks of the
    parts it reads. Items are ordered by the parts they read first, so a task opens a few parts,
    not one or two per pair: each open reads (and, for a catalog's part, checks) the file, a
    whole GET of ~13 MB on a store."""
    ordered = sorted(todo, key=_parts_of)
    tasks = []
    for i in range(0, len(ordered), DRAWINGS_PER_TASK):
        task = ordered[i:i + DRAWINGS_PER_TASK]
        used = {part for item in task for part in _parts_of(item)}
        tasks.append((task, {p: checks[p] for p in used if p in checks}))
    return tasks


def _made_index(report_dir: Path, name: str = THUMB_INDEX) -> dict[str, str]:
    """What an earlier report made (THUMB_INDEX: image_id -> "sha256:size:code", `_thumb_code`;
    DRAW_INDEX: drawing -> "sha_a:sha_b:settings:matches:inliers"), reused when the same bytes,
    settings, code and ORB numbers come again."""
    try:
        return json.loads((report_dir / name).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _thumb_code() -> str:
    """What a thumbnail depends on besides its image's bytes and report.thumb_size: the code and
    libraries that decode and shrink it, this module's (`make_thumb`, `thumb_from_decoded`) and
    the ORB features' (the verify tier decodes the pictures `thumbs_from_store` takes them from).
    A fix to either makes every thumbnail again, not only those of changed files."""
    import hashlib
    from pipeline import catalog
    code = catalog.source_fingerprint(Path(__file__).read_text(encoding="utf-8"))
    return hashlib.sha256(f"{code}:{catalog.code_fingerprint('orb_features')}".encode()).hexdigest()[:12]


def _draw_settings(cfg: Config) -> str:
    """What a drawing depends on besides the two images' bytes and the pair's ORB numbers (which
    choose the evidence drawn: `draw_pairs`): the verify tier's settings, the code and libraries
    that make ORB's pair scores (their catalog fingerprint: a fix there re-scores a catalog's
    pairs, and the drawings with them) and this module's, which draws."""
    import hashlib
    from pipeline import catalog
    code = catalog.source_fingerprint(Path(__file__).read_text(encoding="utf-8"))
    return hashlib.sha256(json.dumps([dataclasses.asdict(cfg.verify), cfg.screen.max_pixels,
                                      cfg.screen.max_decode_bytes, DRAW_HEIGHT, catalog.fingerprints(cfg)["orb"],
                                      code], sort_keys=True, default=str).encode()).hexdigest()[:12]


def _reuse(old: Path, new: Path) -> bool:
    """Carry an earlier thumbnail of the same bytes over (a hard link; a copy across devices)."""
    try:
        os.link(old, new)
    except OSError:
        try:
            shutil.copyfile(old, new)
        except OSError:
            return False
    return True


# ------------------------------------------------------------------------------------------------
# Data


def _num(x, digits: int | None = None):
    if x is None or x is pd.NA or (isinstance(x, (float, np.floating)) and math.isnan(x)):
        return None
    if digits is None:
        return int(x)
    return round(float(x), digits)


def listed_clusters(images: pd.DataFrame, rcfg: ReportConfig) -> tuple[pd.Index, int]:
    """(the cluster ids the report lists, how many clusters there are): largest first, equal sizes
    by the cluster's first path, the first report.max_clusters. `images`: path, cluster_id."""
    clustered = images[images["cluster_id"].notna()]
    by_cluster = clustered.groupby("cluster_id")["path"]
    order = (pd.DataFrame({"size": by_cluster.size(), "first": by_cluster.min()})
             .sort_values(["size", "first"], ascending=[False, True], kind="stable").index)
    return order[:rcfg.max_clusters], len(order)


LINK_ROWS = 65_536  # cluster_links selects over whole clusters of about this many pairs at a time


def shown_pairs(images: pd.DataFrame, pairs: pd.DataFrame, rcfg: ReportConfig) -> tuple[np.ndarray, np.ndarray]:
    """(positions of the pairs the report shows, ascending; positions of its closest rejected
    pairs, closest first): the duplicate pairs the listed clusters show (`cluster_links`) and the
    report.rejected_pairs closest rejected ones. `pairs`: is_duplicate, image_id_a, image_id_b and
    closeness_order's columns; a run takes the pairs it hands to `write_report` with this (their
    decisions are made part by part), and the same call on those pairs selects them all again."""
    listed, total = listed_clusters(images, rcfg)
    dup = pairs["is_duplicate"].astype(bool).to_numpy()
    pairs = pairs[["image_id_a", "image_id_b", "cosine", "orb_inliers", "hash_distance"]]  # (copies of these only)
    rejected = np.flatnonzero(~dup)
    rejected = rejected[closeness_order(pairs.iloc[rejected])][:rcfg.rejected_pairs]
    cluster = _cluster_of(images, pairs["image_id_a"])
    in_listed = np.isin(cluster, np.asarray(listed, dtype=np.int64)) if len(listed) < total else cluster >= 0
    candidates = np.flatnonzero(dup & in_listed)
    shown = np.concatenate([candidates[cluster_links(pairs.iloc[candidates], cluster[candidates],
                                                     rcfg.pairs_per_cluster)], rejected])
    shown.sort()
    return shown, rejected


def cluster_links(pairs: pd.DataFrame, cluster: np.ndarray, per_cluster: int) -> np.ndarray:
    """Which of a cluster's duplicate pairs the report lists (a mask over `pairs`, whose
    `cluster` gives each one's cluster): the closest link of every member first, a spanning tree
    of the cluster in closeness order (members - 1 pairs: every member is shown with the evidence
    that puts it in the cluster), then the closest other pairs while the cluster lists fewer than
    `per_cluster`. A cluster of n images has up to n(n-1)/2 duplicate pairs: listing them all
    made the report (and the driver writing it) grow with the pairs, 436k rows for 100k files of
    ~125 copies each, where a reviewer reads one link per image; pairs.parquet has every pair.
    Same selection when called again on the selected pairs (the spanning tree of a strict order
    is unique, and the selection holds it).

    Made for whole clusters of about LINK_ROWS pairs at a time (a cluster's selection depends on
    its own pairs only; their closeness order within a subset is the same): its working arrays
    (the order, the graph, the spanning tree) stay bounded as the pairs grow."""
    keep = np.zeros(len(pairs), bool)
    if len(pairs) == 0:
        return keep
    cluster = np.asarray(cluster, dtype=np.int64)
    by_cluster = np.argsort(cluster, kind="stable")
    starts = np.flatnonzero(np.r_[True, cluster[by_cluster][1:] != cluster[by_cluster][:-1]])
    ends = np.r_[starts[1:], len(cluster)]
    first = 0
    while first < len(starts):  # whole clusters, at least one, until about LINK_ROWS pairs
        last = first + max(1, int(np.searchsorted(ends[first:], starts[first] + LINK_ROWS, side="right")))
        rows = np.sort(by_cluster[starts[first]:ends[last - 1]])  # (in the pairs' own order)
        keep[rows] = _links(pairs.iloc[rows], cluster[rows], per_cluster)
        first = last
    return keep


def _links(pairs: pd.DataFrame, cluster: np.ndarray, per_cluster: int) -> np.ndarray:
    """`cluster_links` over the pairs of some whole clusters."""
    n = len(pairs)
    keep = np.zeros(n, bool)
    if n == 0:
        return keep
    order = closeness_order(pairs)
    rank = np.empty(n, np.int64)
    rank[order] = np.arange(n)
    nodes, ids = pd.factorize(pd.concat([pairs["image_id_a"], pairs["image_id_b"]], ignore_index=True))
    a, b = np.minimum(nodes[:n], nodes[n:]), np.maximum(nodes[:n], nodes[n:])
    # one edge per pair of images, its closest row (a repeated row, as in hand-joined outputs,
    # would otherwise be summed into one weight by scipy)
    edge = order[~pd.Series(a[order] * np.int64(len(ids)) + b[order]).duplicated().to_numpy()]
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import minimum_spanning_tree
    # weights: the closeness rank + 1 (0 would be no edge), each distinct, so the tree is unique
    graph = coo_matrix(((rank[edge] + 1).astype(np.float64), (a[edge], b[edge])), shape=(len(ids), len(ids)))
    tree = minimum_spanning_tree(graph).tocoo()
    keep[order[tree.data.astype(np.int64) - 1]] = True
    rest = order[~keep[order]]  # the others, closest first
    room = np.maximum(per_cluster - pd.Series(keep).groupby(cluster).transform("sum").to_numpy(), 0)
    taken = pd.Series(np.ones(len(rest), np.int64)).groupby(cluster[rest]).cumsum().to_numpy()
    keep[rest[taken <= room[rest]]] = True
    return keep


def _cluster_of(images: pd.DataFrame, image_ids) -> np.ndarray:
    """The cluster id (int64, -1 for none) of each image in `image_ids`. `images`: image_id,
    cluster_id (nullable: the ids are 63-bit, so never through float64)."""
    cluster_of = pd.Series(images["cluster_id"].astype("Int64").array, index=images["image_id"].to_numpy())
    return cluster_of.reindex(np.asarray(image_ids, dtype=np.int64)).to_numpy(dtype=np.int64, na_value=-1)


def duplicate_pairs_per_cluster(images: pd.DataFrame, is_duplicate, image_id_a) -> pd.Series:
    """How many duplicate pairs each cluster has (by cluster id; a duplicate pair's two images
    are in one cluster). `images`: image_id, cluster_id."""
    cluster = _cluster_of(images, np.asarray(image_id_a)[np.asarray(is_duplicate, bool)])
    return pd.Series(cluster[cluster >= 0]).value_counts()


def build_data(images: pd.DataFrame, pairs: pd.DataFrame, manifest: dict, rcfg: ReportConfig,
               rejected_total: int | None = None, cluster_pairs: pd.Series | None = None) -> dict:
    """The report's data (what data.js holds) from normalised images and pairs with `rule`.
    `rejected_total` and `cluster_pairs` (duplicate_pairs_per_cluster): how many pairs were
    rejected in all and how many duplicate pairs each cluster has, when `pairs` holds only those
    `shown_pairs` selects (a run's); counted from `pairs` otherwise.

    Image ids are strings: they are 63-bit and JavaScript numbers keep 53 bits."""
    cluster_order, clusters_total = listed_clusters(images, rcfg)
    # (rows taken with the columns they are read for only: at 100k files most images are listed)
    clustered = images.loc[images["cluster_id"].isin(cluster_order),
                           ["cluster_id", "image_id", "path", "bytes", "width", "height", "mtime",
                            *(["abs_path"] if rcfg.keep == "preferred_folder" else [])]]
    keepers = keeper_ids(clustered, rcfg.keep, rcfg.prefer) if len(clustered) else pd.Series(dtype="int64")

    dup = pairs["is_duplicate"].astype(bool).to_numpy()
    if rejected_total is None:
        rejected_total = int((~dup).sum())
    if cluster_pairs is None:
        cluster_pairs = duplicate_pairs_per_cluster(images, dup, pairs["image_id_a"])
    shown, rejected = shown_pairs(images, pairs, rcfg)
    if len(shown) < len(pairs):  # (a run's pairs are the shown ones already: no copy of them)
        pairs = pairs.iloc[shown].reset_index(drop=True)
    rejected_pos = np.searchsorted(shown, rejected)

    errors = images[images["error"].notna()]
    errors_total = len(errors)
    errors = errors.sort_values("path", kind="stable").iloc[:rcfg.max_errors]
    wanted = np.concatenate([np.asarray(ids, dtype=np.int64) for ids in (
        clustered["image_id"], pairs["image_id_a"], pairs["image_id_b"], errors["image_id"])])
    shown = images.loc[images["image_id"].isin(wanted), ["image_id", "path", "bytes", "width", "height", "format",
                                                          "mtime", "error"]] \
        .sort_values("path", kind="stable").reset_index(drop=True)
    pos = pd.Series(np.arange(len(shown)), index=shown["image_id"].to_numpy())

    mtime = pd.to_datetime(shown["mtime"], utc=True).dt.strftime("%Y-%m-%d %H:%M UTC").array  # (said: not local time)
    img_rows = Rows(len(shown), image_id=(shown["image_id"].to_numpy(np.int64), lambda v: [str(i) for i in v.tolist()]),
                    path=(shown["path"].array, _texts), bytes=(shown["bytes"].array, _numbers()),
                    width=(shown["width"].array, _numbers()), height=(shown["height"].array, _numbers()),
                    format=(shown["format"].array, _texts), mtime=(mtime, _texts), error=(shown["error"].array, _texts))

    pa_pos = pos.reindex(pairs["image_id_a"].to_numpy()).to_numpy()
    pb_pos = pos.reindex(pairs["image_id_b"].to_numpy()).to_numpy()
    by = closeness_by(pairs)
    # one string object per distinct stage, rule, reason and closeness text: the rows repeat a few
    # values (a run's reasons: thousands for ~100k pairs) and each row would otherwise hold its own
    stage, rule, reason, closeness = (_distinct_texts(values, text) for values, text in (
        (pairs["stage"], str), (pairs["rule"], str),
        (pairs["reason"], lambda v: v if isinstance(v, str) else ""), (by, str)))
    pair_rows = Rows(len(pairs), a=(pa_pos.astype(np.int64), _plain), b=(pb_pos.astype(np.int64), _plain),
                     hash_distance=(pairs["hash_distance"].array, _numbers()),
                     orb_matches=(pairs["orb_matches"].array, _numbers()),
                     orb_inliers=(pairs["orb_inliers"].array, _numbers()),
                     orb_score=(pairs["orb_score"].array, _numbers(3)), cosine=(pairs["cosine"].array, _numbers(6)),
                     stage=(stage, _plain), rule=(rule, _plain),
                     is_duplicate=(pairs["is_duplicate"].astype(bool).to_numpy(), _plain), reason=(reason, _plain),
                     drawing=(np.full(len(pairs), None, dtype=object), _plain), closeness=(closeness, _plain))

    # duplicate pairs of each cluster (both ends in it): the links that put each member in it (the
    # spanning tree cluster_links lists first) closest first, then the others closest first; in
    # path order, a cluster's first rows (the page shows 8) were the first member's pairs, the
    # tree's links and the closest pair behind "show all"
    cid_of = pd.Series(images["cluster_id"].fillna(-1).to_numpy(dtype=np.int64), index=images["image_id"].to_numpy())
    ca = cid_of.reindex(pairs["image_id_a"].to_numpy()).to_numpy()
    cb = cid_of.reindex(pairs["image_id_b"].to_numpy()).to_numpy()
    same = (ca == cb) & (ca >= 0) & pairs["is_duplicate"].astype(bool).to_numpy()
    rows = np.flatnonzero(same)
    if len(rows):
        tree = cluster_links(pairs.iloc[rows], ca[rows], 0)  # (per_cluster 0: the tree's links only)
        rank = np.empty(len(pairs), np.int64)
        rank[closeness_order(pairs)] = np.arange(len(pairs))
        rows = rows[np.lexsort((rank[rows], ~tree, ca[rows]))]
    pair_groups = pd.Series(rows).groupby(ca[rows], sort=False).apply(list) if len(rows) else pd.Series(dtype=object)
    member_groups = pd.Series(pos.reindex(clustered["image_id"].to_numpy()).to_numpy()) \
        .groupby(clustered["cluster_id"].to_numpy(dtype=np.int64)).apply(lambda s: sorted(s.tolist()))
    cluster_rows = []
    for cid in cluster_order:
        cid = int(cid)
        members = member_groups.get(cid, [])
        keeper = int(pos[keepers[cid]]) if cid in keepers.index else None
        cluster_rows.append([str(cid), members, keeper, pair_groups.get(cid, []), int(cluster_pairs.get(cid, 0))])

    counts = manifest.get("counts", {})
    return {
        "meta": {"root": manifest.get("root"), "root_named": _root_named(manifest.get("root")),
                 "finished": manifest.get("finished"), "counts": counts,
                 "page_size": rcfg.page_size, "keep": rcfg.keep, "rejected_total": rejected_total,
                 "rejected_limit": rcfg.rejected_pairs, "clusters_total": clusters_total,
                 "errors_total": errors_total},
        "images": img_rows, "pairs": pair_rows, "clusters": cluster_rows,
        "rejected": [int(i) for i in rejected_pos],
        "errors": [int(pos[i]) for i in errors["image_id"]],
        "rules": RULE_CODES,
    }


def _draw_list(data: dict, rcfg: ReportConfig) -> list[int]:
    """Pairs to draw: each cluster's first duplicate pair ORB matched anything in, clusters in page
    order, then each cluster's second, ... up to draw_pairs; then the draw_rejected closest rejected
    ones ORB matched anything in. One per cluster first: the evidence of the first draw_pairs clusters rather than every
    pair of the first two or three; and a re-run that grows some clusters draws again only for the
    clusters that moved into the first draw_pairs (the others' drawings are reused)."""
    pairs = data["pairs"]
    # (pairs ORB matched something in: a drawing of no match at all, e.g. a pixel-checked flat
    # pair's, showed no line under "green = inliers, red = outliers" and took a rejected slot)
    had_orb = [p[3] is not None and p[3] > 0 for p in pairs]
    per_cluster = [[i for i in cluster[3] if had_orb[i]] for cluster in data["clusters"]]
    picked: list[int] = []
    depth = 0
    while len(picked) < rcfg.draw_pairs and any(depth < len(c) for c in per_cluster):
        picked += [c[depth] for c in per_cluster if depth < len(c)][:rcfg.draw_pairs - len(picked)]
        depth += 1
    picked += [i for i in data["rejected"] if had_orb[i]][:rcfg.draw_rejected]
    return picked


def write_report(out_dir: str | Path, images: pd.DataFrame, pairs: pd.DataFrame, manifest: dict,
                 cfg: Config | None = None, reuse_from: "str | Path | storage.LastReport | None" = None,
                 stored_features: pd.DataFrame | None = None, client=None,
                 rejected_total: int | None = None, cluster_pairs: pd.Series | None = None) -> Path:
    """Write OUT/report/ and OUT/report.html; returns the index page's path.

    `images`/`pairs`: the run's frames (in memory or as read from the Parquet files: abs paths
    are rebuilt from the manifest's root when missing); `cfg` defaults to run.json's config.
    `reuse_from`: an earlier report folder (default: out_dir/report, a rebuild in place) whose
    thumbnails and drawings of the same bytes and settings are linked instead of made again; or
    the last report on a store (storage.LastReport), whose files are carried by name (the publish
    copies them on the server) and are not in `out_dir`.
    `stored_features`: where the verify tier's feature rows are (run.stored_features: by sha256),
    whose thumbnails (when of this report.thumb_size: `thumbs_from_store`) and keypoints
    (`draw_pair`) are taken instead of decoding the files again. `client`: a Dask client whose
    workers make the thumbnails and drawings (they read the images and feature parts where they
    are, and return JPEG bytes that this process writes as each task ends), so the driver decodes
    no image; without one, this process's threads do. `rejected_total`, `cluster_pairs`: how many
    pairs were rejected in all and how many duplicate pairs each cluster has
    (`duplicate_pairs_per_cluster`) when `pairs` holds only those the report shows (`shown_pairs`:
    a run's)."""
    out_dir = Path(out_dir)
    if cfg is None:
        cfg, rcfg = _report_config(manifest)
    else:
        rcfg = cfg.report
    images = normalize_images(images[[c for c in IMAGE_COLUMNS if c in images]], manifest.get("root"))
    pairs = pairs.reset_index(drop=True)
    if "rule" not in pairs:
        pairs = pairs.assign(rule=derive_rule(pairs))
    data = build_data(images, pairs, manifest, rcfg, rejected_total, cluster_pairs)
    del pairs  # (data holds the rows it shows)
    # the listed images' paths and content, by their position in data["images"]: taken from the
    # images' own arrays as each is needed (dicts by image id of the ~98k listed images of a
    # 100k-file run were ~40 MB of Python strings at the driver's peak)
    listed = data["images"]
    ids = listed.values("image_id")
    at = pd.Index(images["image_id"].astype("int64")).get_indexer(ids)
    # the files as the operating system names them (a rebuild reads the outputs' text forms, which
    # name no file where a name, or the scanned folder's, is not UTF-8: no thumbnail was made)
    raw_at = images["raw_path"].array.take(at) if "raw_path" in images else [None] * len(at)
    abs_at = np.array([paths.os_name(a, p, r) for a, p, r in zip(images["abs_path"].array.take(at),
                                                                 images["path"].array.take(at), raw_at)], dtype=object)
    sha_at = images["sha256"].array.take(at)
    error_at = listed.values("error")

    tmp = out_dir / f".report-{uuid.uuid4().hex[:12]}"
    (tmp / "thumbs").mkdir(parents=True)
    (tmp / "pairs").mkdir()
    if reuse_from is None or isinstance(reuse_from, (str, os.PathLike)):
        earlier = Path(reuse_from) if reuse_from is not None else out_dir / "report"

        def carry(name: str) -> bool:  # ("thumbs/<id>.jpg", "pairs/<name>")
            return _reuse(earlier / name, tmp / name)
    else:  # storage.LastReport: its indexes are local, its files stay on the store
        earlier, carry = reuse_from.folder, reuse_from.carry
    try:
        previous, thumb_code = _made_index(earlier), _thumb_code()
        has_thumb = np.zeros(len(listed), dtype=bool)  # by position in data["images"]
        jobs: list[tuple] = []  # (kind, fn, args): the pixel work, on the cluster or this process's threads
        from_store: dict[str, list] = {}  # feature part -> thumbnails to take from it (by position)
        decode: list[tuple[int, str]] = []  # thumbnails to decode from the files (by position)
        where = stored_features if stored_features is not None else \
            pd.DataFrame(columns=["part_path", "key", "mirrored_part_path", "mirrored_key"])
        for k in range(len(listed)):
            sha, name = sha_at[k], str(ids[k])
            if isinstance(error_at[k], str):
                continue
            if previous.get(name) == f"{sha}:{rcfg.thumb_size}:{thumb_code}" and carry(f"thumbs/{name}.jpg"):
                has_thumb[k] = True
            elif sha in where.index:
                from_store.setdefault(where.at[sha, "part_path"], []).append(
                    (k, int(where.at[sha, "key"]), abs_at[k]))
            else:
                decode.append((k, abs_at[k]))
        del previous
        # a catalog's parts are checked against what it lists by the task that reads them
        check_columns = (["part_path", "part_check"], ["mirrored_part_path", "mirrored_part_check"])
        checks = {part: check for columns in check_columns if columns[1] in where
                  for part, check in where[columns].dropna().drop_duplicates().to_numpy()}
        jobs += [("thumbs", thumbs_from_store, (part, wanted, rcfg.thumb_size, checks.get(part)))
                 for part, wanted in from_store.items()]
        jobs += [("thumbs", make_thumbs, (decode[i:i + THUMBS_PER_TASK], rcfg.thumb_size))
                 for i in range(0, len(decode), THUMBS_PER_TASK)]
        drawn = _draw_list(data, rcfg)
        drawn_before, settings = _made_index(earlier, DRAW_INDEX), _draw_settings(cfg)
        drew, todo, index_of = {}, [], {}
        drawing = data["pairs"].values("drawing")
        for i in drawn:
            pair = data["pairs"][i]
            ka, kb = pair[0], pair[1]
            name = f"{ids[ka]}-{ids[kb]}.jpg"
            drew[name] = f"{sha_at[ka]}:{sha_at[kb]}:{settings}:{pair[3]}:{pair[4]}"  # (+ the run's ORB numbers)
            index_of[name] = i
            if drawn_before.get(name) == drew[name] and carry(f"pairs/{name}"):
                drawing[i] = name
            else:  # run_numbers: orb_matches, orb_inliers (the tier's orientation)
                todo.append((name, abs_at[ka], abs_at[kb], _draw_sources(where, sha_at[ka], sha_at[kb]),
                             tuple(pair[3:5])))
        jobs += [("pairs", draw_pairs, (task, cfg, task_checks)) for task, task_checks in drawing_tasks(todo, checks)]
        kinds = [kind for kind, _, _ in jobs]
        # the tasks' file lists are held only by `completed`, each until its task ends (for a resend)
        pending = completed(client, [(fn, args) for _, fn, args in jobs], threads=os.cpu_count() or 1)
        del jobs, from_store, decode, todo
        for n, result in pending:
            kind = kinds[n]
            for name, made_now in result.items():  # written as each task ends: nothing piles up here
                if kind == "thumbs":  # (name: the image's position in data["images"])
                    if made_now:
                        (tmp / "thumbs" / f"{ids[name]}.jpg").write_bytes(made_now)
                    has_thumb[name] = bool(made_now)
                elif made_now is not None:
                    (tmp / "pairs" / name).write_bytes(made_now[0])
                    drawing[index_of[name]] = name
        listed.add("has_thumb", has_thumb)  # [8]: has a thumbnail
        # [9]: the path's text is the file's name (else a name that is not UTF-8, shown with \xNN
        # escapes, which no link can name; a valid name may hold such text too)
        listed.add("named", np.array([not isinstance(r, (bytes, bytearray)) for r in raw_at], dtype=bool))
        drew = {name: v for name, v in drew.items() if drawing[index_of[name]] == name}
        data["meta"]["generated"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        with open(tmp / "data.js", "w", encoding="utf-8") as fh:
            fh.write("window.DEDUPE_REPORT = ")
            for piece in iter_script_json(data):
                fh.write(piece)
            fh.write(";\n")
        with open(tmp / THUMB_INDEX, "w", encoding="utf-8") as fh:  # image_id -> "sha256:size:code" of each made
            fh.write("{")
            for n, k in enumerate(np.flatnonzero(has_thumb)):
                fh.write(("," if n else "") + json.dumps(str(ids[k])) + ":"
                         + json.dumps(f"{sha_at[k]}:{rcfg.thumb_size}:{thumb_code}"))
            fh.write("}")
        (tmp / DRAW_INDEX).write_text(json.dumps(drew), encoding="utf-8")
        for name in STATIC:
            (tmp / name).write_bytes(_static(name))
        env = _env()
        counts = manifest.get("counts", {})
        page = env.get_template("index.html.j2").render(
            root=manifest.get("root"), finished=manifest.get("finished"), counts=counts,
            n_clusters=len(data["clusters"]), n_pairs=len(data["pairs"]), n_errors=len(data["errors"]),
            clusters_total=data["meta"]["clusters_total"], errors_total=data["meta"]["errors_total"],
            n_rejected=len(data["rejected"]), rejected_total=data["meta"]["rejected_total"],
            rules=RULE_CODES, keep=rcfg.keep, decide=(manifest.get("config") or {}).get("decide", {}),
            verify=(manifest.get("config") or {}).get("verify", {}), tiers=(manifest.get("config") or {}).get("tiers"))
        (tmp / "index.html").write_text(page, encoding="utf-8")
        final = out_dir / "report"
        old = out_dir / f".report-old-{uuid.uuid4().hex[:12]}"
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    redirect = env.get_template("redirect.html.j2").render(n_clusters=data["meta"]["clusters_total"])
    link = out_dir / "report.html"
    tmp_link = out_dir / f".report.html.{uuid.uuid4().hex}.tmp"
    tmp_link.write_text(redirect, encoding="utf-8")
    os.replace(tmp_link, link)
    return final / "index.html"
