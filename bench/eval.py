"""The accuracy harness (`make eval`): the real pipeline, through its CLI, on a generated
near-duplicate benchmark and on the labelled sets, scored against labels, with baselines measured
on the same files in the same run.

    python -m bench.eval --out docs/benchmarks.md                 # everything (a few minutes)
    python -m bench.eval --sets generated --sources 40            # quick look while developing
    python -m bench.eval --set screen.max_distance=12 --json after.json   # a config experiment
    python -m bench.eval --score OUT --labels path/labels.csv     # score an existing output only

Sets: `generated` (bench/transforms.py, cached by seed/size in --bench-dir) and every folder of
$SHARED/data/labelled with a labels.csv. Scoring definitions: bench/score.py.

Baselines (all pairs of the labelled files, no cascade): aHash and pHash (imagehash, 64-bit) at
Hamming distance <= 10 and at their best-F1 distance; MobileNetV2 alpha 0.5 (ImageNet weights,
avg-pooled, L2-normalised, 224x224 squash) cosine at the best-F1 threshold and at the lowest
threshold with precision >= 0.99. Best-F1 thresholds are chosen on the set being scored, so they
are optimistic (an oracle per set), which is the point of a ceiling.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from bench import report, score as sc, transforms  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("SHARED", REPO.parent / "shared")).resolve()
LABELLED = SHARED / "data" / "labelled"
MODELS = SHARED / "models"
SECTION = "eval"
TITLE = "Accuracy (make eval)"
HASH_DISTANCE = 10
EMBED_WEIGHTS = "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.5_224_no_top.h5"  # (the baselines' MobileNet)


# ---------------------------------------------------------------------------------------------
# running the pipeline

def run_pipeline(data: Path, out: Path, overrides: list[str], timeout: float, preset: str | None = None,
                 no_catalog: bool = False) -> dict:
    """`python -m pipeline dedupe DATA --out OUT --quiet [--preset P] [--no-catalog] --set ...` ->
    {"ok", "returncode", "seconds", "command", "stderr_tail"}."""
    if out.exists():
        shutil.rmtree(out)  # a clean run, not an incremental rerun
    out.parent.mkdir(parents=True, exist_ok=True)
    sets = list(overrides)
    if not any(s.split("=", 1)[0].strip() == "embed.weights" for s in sets) and MODELS.is_dir():
        sets.append(f"embed.weights={MODELS}")  # the shared weights folder: no Keras cache needed
    cmd = [sys.executable, "-m", "pipeline", "dedupe", str(data), "--out", str(out), "--quiet"]
    if preset:
        cmd += ["--preset", preset]
    if no_catalog:
        cmd.append("--no-catalog")
    for s in sets:
        cmd += ["--set", s]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        rc, err = proc.returncode, proc.stderr
    except subprocess.TimeoutExpired as exc:
        rc, err = -1, f"timed out after {timeout:.0f} s\n{exc.stderr or ''}"
    seconds = time.perf_counter() - t0
    ok = rc == 0 and (out / "pairs.parquet").exists() and (out / "images.parquet").exists()
    return {"ok": ok, "returncode": rc, "seconds": seconds, "command": " ".join(cmd),
            "stderr_tail": "\n".join((err or "").strip().splitlines()[-15:])}


# ---------------------------------------------------------------------------------------------
# baselines

def _load_rgb(path: Path):
    from pipeline import decode
    img, _, _ = decode.load_image(path)
    return img


def _pack(bits: np.ndarray) -> np.uint64:
    return np.uint64(int("".join("1" if b else "0" for b in bits.flatten()), 2))


class _OwnEmbedder:
    """Fallback when pipeline.confirm is unavailable: the same model, plain Keras."""

    def __init__(self, weights: Path):
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        import keras
        self.keras = keras
        self.model = keras.applications.MobileNetV2(input_shape=(224, 224, 3), alpha=0.5, include_top=False,
                                                    pooling="avg", weights=str(weights))

    def embed(self, images):
        from PIL import Image
        x = np.stack([np.asarray(im.convert("RGB").resize((224, 224), Image.Resampling.BILINEAR),
                                 dtype=np.float32) for im in images])
        x = self.keras.applications.mobilenet_v2.preprocess_input(x)
        out = np.concatenate([np.asarray(self.model(x[i:i + 32], training=False)) for i in range(0, len(x), 32)])
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


_EMBEDDER = None


def embedder():
    """The pipeline's own Embedder (pipeline.confirm) when importable, else plain Keras."""
    global _EMBEDDER
    if _EMBEDDER is None:
        weights = MODELS / EMBED_WEIGHTS
        try:
            from pipeline.config import EmbedConfig
            from pipeline.confirm import Embedder
            from pipeline.weights import resolve_weights
            cfg = EmbedConfig()
            cfg.backbone, cfg.alpha, cfg.input_size, cfg.weights = "MobileNetV2", 0.5, 224, str(weights)
            if hasattr(cfg, "resize"):
                cfg.resize = "squash"
            cfg.batch_size = 32
            _EMBEDDER = Embedder(cfg, resolve_weights(cfg, allow_download=False))
            _EMBEDDER.source = "pipeline.confirm.Embedder"
        except ImportError:
            _EMBEDDER = _OwnEmbedder(weights)
            _EMBEDDER.source = "bench.eval (keras)"
    return _EMBEDDER


def _pair_index(n: int):
    return np.triu_indices(n, 1)


def baselines(root: Path, labels: pd.DataFrame, with_embeddings: bool = True) -> dict:
    """aHash/pHash at distance <= 10 (and best-F1 distance), MobileNet cosine (best-F1 and P>=0.99),
    all pairs of the labelled files; files that fail to decode predict nothing."""
    import imagehash
    paths, ahash, phash, imgs = [], [], [], []
    t0 = time.perf_counter()
    for p in labels["path"]:
        try:
            img = _load_rgb(root / p)
        except Exception:  # noqa: BLE001 - a file the baseline cannot read predicts nothing
            continue
        paths.append(p)
        ahash.append(_pack(imagehash.average_hash(img).hash))
        phash.append(_pack(imagehash.phash(img).hash))
        if with_embeddings:
            imgs.append(img.copy() if max(img.size) <= 512 else _small(img))
    hash_s = time.perf_counter() - t0
    group = dict(zip(labels["path"], labels["group"]))
    g = np.array([group[p] for p in paths], dtype=object)
    ia, ib = _pair_index(len(paths))
    is_true = g[ia] == g[ib]
    truth_total = len(sc.true_pairs(labels))  # includes pairs with unreadable files (misses)
    parr = np.array(paths, dtype=object)
    out = {"decoded": len(paths), "files": len(labels), "hash_seconds": hash_s, "methods": {}}

    def record(name, rule, mask):
        pred = pd.DataFrame({"path_a": parr[ia[mask]], "path_b": parr[ib[mask]], "is_duplicate": True})
        s = sc.score({"pairs": pred, "images": None}, labels)
        out["methods"][name] = {"rule": rule, **{k: s["final"][k] for k in ("precision", "recall", "f1")},
                                "per_transform": {t: v["final_recall"] for t, v in s.get("per_transform", {}).items()},
                                "per_category": {c: v["final_recall"] for c, v in s.get("per_category", {}).items()}}
        out.setdefault("n_per_transform", {t: v["n"] for t, v in s.get("per_transform", {}).items()})
        out.setdefault("n_per_category", {c: v["n"] for c, v in s.get("per_category", {}).items()})

    for name, hashes in (("aHash", ahash), ("pHash", phash)):
        h = np.array(hashes, dtype=np.uint64)
        dist = np.bitwise_count(h[ia] ^ h[ib]).astype(np.int64)
        record(f"{name} <= {HASH_DISTANCE}", f"distance <= {HASH_DISTANCE}", dist <= HASH_DISTANCE)
        th, P, R = sc.threshold_sweep(dist.astype(float), is_true, truth_total, higher_is_closer=False)
        best = sc.best_f1(th, P, R)
        if np.isfinite(best["threshold"]):
            t = int(best["threshold"])
            record(f"{name} best-F1", f"distance <= {t}", dist <= t)
    if with_embeddings and paths:
        t0 = time.perf_counter()
        emb_model = embedder()
        emb = np.concatenate([emb_model.embed(imgs[i:i + 64]) for i in range(0, len(imgs), 64)])
        cos = np.einsum("ij,ij->i", emb[ia], emb[ib]) if len(ia) else np.zeros(0)
        out["embed_seconds"] = time.perf_counter() - t0
        out["embedder"] = getattr(emb_model, "source", "")
        th, P, R = sc.threshold_sweep(cos.astype(np.float64), is_true, truth_total, higher_is_closer=True)
        for name, pick in (("MobileNet best-F1", sc.best_f1(th, P, R)),
                           ("MobileNet P>=0.99", sc.at_precision(th, P, R, 0.99))):
            t = pick["threshold"]
            if np.isfinite(t):
                record(name, f"cosine >= {t:.3f}", cos >= t)
                out["methods"][name]["threshold"] = t
            else:
                out["methods"][name] = {"rule": "no threshold reaches precision 0.99", "precision": float("nan"),
                                        "recall": 0.0, "f1": 0.0, "per_transform": {}, "per_category": {}}
    return out


def _small(img):
    from PIL import Image
    img = img.copy()
    img.thumbnail((512, 512), Image.Resampling.BILINEAR)
    return img


# ---------------------------------------------------------------------------------------------
# sets

def labelled_sets() -> dict[str, Path]:
    if not LABELLED.is_dir():
        return {}
    return {d.name: d for d in sorted(LABELLED.iterdir()) if (d / "labels.csv").is_file()}


def evaluate_set(name: str, root: Path, args, overrides: list[str]) -> dict:
    labels = sc.load_labels(root / "labels.csv")
    res = {"set": name, "root": str(root), "files": len(labels), "true_pairs": len(sc.true_pairs(labels))}
    out = Path(args.bench_dir) / "runs" / name
    if not args.no_pipeline:
        log(f"[{name}] pipeline on {len(labels)} labelled files ...")
        run = run_pipeline(root, out, overrides, args.timeout, preset=args.preset)
        res["run"] = run
        if run["ok"]:
            res["score"] = sc.score(out, labels, root=root)
            f = res["score"]["final"]
            log(f"[{name}] {run['seconds']:.1f} s, final P {f['precision']:.3f} R {f['recall']:.3f} F1 {f['f1']:.3f}")
            manifest = out / "run.json"
            if manifest.exists():
                try:
                    m = json.loads(manifest.read_text())
                    res["run"]["tiers"] = (m.get("config") or {}).get("tiers")
                except ValueError:
                    pass
        else:
            log(f"[{name}] pipeline FAILED (exit {run['returncode']}):\n{run['stderr_tail']}")
    if not args.no_baselines:
        log(f"[{name}] baselines ...")
        res["baselines"] = baselines(root, labels, with_embeddings=not args.no_embeddings)
    return res


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# report

def _f(x) -> str:
    return "–" if x is None or (isinstance(x, float) and not np.isfinite(x)) else f"{x:.3f}"


DEFINITIONS = """\
How to read this: **pairs** = the pipeline's `is_duplicate` rows, expanded over byte-identical
copies (the pipeline compares one file per exact group: a row (A, B) also stands for (A', B) when
A' is identical to A); **clusters** = all pairs sharing a `cluster_id` (adds pairs implied by
transitivity); **B³** = B-cubed over labelled files (singletons included).
Tier rows: *screen* = true pairs present as candidate rows at all (whatever the verdict);
*verify* = still alive after ORB (duplicate, or forwarded to confirm); *confirm* = final.
Recall = true pairs alive / all true pairs; precision = true alive / alive. Only labelled files
count: pairs with an unlabelled file are ignored. Categories of the generated set (see
`bench/transforms.py`): easy = codec/scale/photometric (incl. JPEG q20, 128 px thumbnail),
medium = dihedral, 90% crops, 3° rotation, overlays, bars; hard = 75%/60% crops, 8° rotation, screenshot frame;
copy-vs-copy = pairs of two edited copies of one photo. Baselines run on all pairs of the same
files; their best-F1 thresholds are fitted on the set itself (an optimistic ceiling).
"""


def render(results: list[dict], args, overrides: list[str]) -> str:
    body = [report.stamp()]
    if overrides or args.preset:
        given = ([f"--preset {args.preset}"] if args.preset else []) + [f"--set {s}" for s in overrides]
        body.append(f"Pipeline options: `{' '.join(given)}`\n")
    body.append(DEFINITIONS)
    rows = []
    for r in results:
        s = r.get("score")
        run = r.get("run", {})
        if s:
            f, c, b = s["final"], s["clusters"], s["bcubed"]
            rows.append([r["set"], r["files"], r["true_pairs"], _f(f["precision"]), _f(f["recall"]), _f(f["f1"]),
                         _f(c["precision"]), _f(c["recall"]), _f(c["f1"]), _f(b["f1"]), f"{run['seconds']:.1f}"])
        else:
            why = "not run" if not run else f"FAILED (exit {run['returncode']})"
            rows.append([r["set"], r["files"], r["true_pairs"], why, "", "", "", "", "", "", ""])
    body.append("### Pipeline, final decisions\n")
    body.append(report.table(["set", "files", "true pairs", "pairs P", "pairs R", "pairs F1", "clusters P",
                              "clusters R", "clusters F1", "B³ F1", "wall s (one run)"], rows))
    trows = []
    for r in results:
        s = r.get("score")
        if not s:
            continue
        for tier, v in s["tiers"].items():
            trows.append([r["set"], tier, v["predicted"], v["tp"], _f(v["precision"]), _f(v["recall"])])
    if trows:
        body.append("\n### Pipeline, per tier (pairs alive after the tier)\n")
        body.append(report.table(["set", "tier", "alive pairs", "true alive", "precision", "recall"], trows))
    brows = []
    for r in results:
        if r.get("score"):
            f = r["score"]["final"]
            brows.append([r["set"], "**pipeline**", "final is_duplicate", _f(f["precision"]), _f(f["recall"]), _f(f["f1"])])
        for name, m in (r.get("baselines") or {}).get("methods", {}).items():
            brows.append([r["set"], name, m["rule"], _f(m["precision"]), _f(m["recall"]), _f(m["f1"])])
    if brows:
        body.append("\n### Baselines (all pairs, same files)\n")
        body.append(report.table(["set", "method", "rule", "P", "R", "F1"], brows))
    gen = next((r for r in results if r["set"] == "generated"), None)
    if gen:
        body.append(_per_transform(gen))
    notes = []
    for r in results:
        s = r.get("score")
        if s:
            info = s["info"]
            if info.get("labelled_missing_from_output"):
                notes.append(f"- {r['set']}: {len(info['labelled_missing_from_output'])} labelled files not in "
                             f"images.parquet, e.g. `{info['labelled_missing_from_output'][0]}`")
            for p, e in list(info.get("labelled_with_error", {}).items())[:5]:
                notes.append(f"- {r['set']}: `{p}` error: {e}")
            if info.get("ignored_unlabelled"):
                notes.append(f"- {r['set']}: {info['ignored_unlabelled']} candidate rows involve unlabelled files "
                             f"(ignored)")
        if r.get("run") and not r["run"]["ok"]:
            last = (r["run"]["stderr_tail"].splitlines() or ["(no stderr)"])[-1]
            notes.append(f"- {r['set']}: pipeline failed (exit {r['run']['returncode']}): `{last.strip()}`")
        b = r.get("baselines")
        if b:
            emb = f", MobileNet embeddings {b['embed_seconds']:.1f} s via {b.get('embedder')}" if "embed_seconds" in b else ""
            notes.append(f"- {r['set']}: baselines decoded {b['decoded']}/{b['files']} files; decode+hashes "
                         f"{b['hash_seconds']:.1f} s{emb}")
    if notes:
        body.append("\n### Notes\n\n" + "\n".join(notes) + "\n")
    return "\n".join(body)


def _per_transform(gen: dict) -> str:
    s = gen.get("score") or {}
    bl = (gen.get("baselines") or {}).get("methods", {})
    bnames = [n for n in ("aHash <= 10", "pHash <= 10", "MobileNet best-F1") if n in bl]
    tiers = list(s.get("tiers", {}).keys()) if s else []
    head_p = [f"{t} R" for t in tiers] + (["final R", "clusters R"] if s else [])
    out = []
    per_c = s.get("per_category") or {}
    cats = list(per_c) or sorted({c for n in bnames for c in bl[n]["per_category"]})
    order = {"easy": 0, "medium": 1, "hard": 2, "copy-vs-copy": 3}
    rows = []
    for c in sorted(cats, key=lambda c: (order.get(c, 9), c)):
        v = per_c.get(c, {})
        n = v.get("n", (gen.get("baselines") or {}).get("n_per_category", {}).get(c, ""))
        rows.append([c, n, *[_f(v.get(f"{t}_recall")) for t in tiers],
                     *([_f(v.get("final_recall")), _f(v.get("clusters_recall"))] if s else []),
                     *[_f(bl[b]["per_category"].get(c)) for b in bnames]])
    out.append("\n### Generated set: recall per category\n")
    out.append(report.table(["category", "true pairs", *head_p, *[f"{b} R" for b in bnames]], rows))
    per_t = s.get("per_transform") or {}
    cat_of = {t: v["category"] for t, v in per_t.items()}
    cat_of.update({t.name: t.category for t in transforms.TRANSFORMS})
    names = list(per_t) or sorted({t for n in bnames for t in bl[n]["per_transform"]})
    rows = []
    for t in sorted(names, key=lambda t: (order.get(cat_of.get(t, "copy-vs-copy"), 9), t)):
        v = per_t.get(t, {})
        n = v.get("n", (gen.get("baselines") or {}).get("n_per_transform", {}).get(t, ""))
        rows.append([t, cat_of.get(t, "copy-vs-copy"), n, *[_f(v.get(f"{x}_recall")) for x in tiers],
                     *([_f(v.get("final_recall")), _f(v.get("clusters_recall"))] if s else []),
                     *[_f(bl[b]["per_transform"].get(t)) for b in bnames]])
    out.append("\n### Generated set: recall per transform (pair = original vs. the edited copy)\n")
    out.append(report.table(["transform", "category", "true pairs", *head_p, *[f"{b} R" for b in bnames]], rows))
    return "\n".join(out)


def _jsonable(o):
    if isinstance(o, dict):
        return {str(k): _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple, set)):
        return [_jsonable(v) for v in o]
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.bool_):
        return bool(o)
    return o


# ---------------------------------------------------------------------------------------------
# command line

def text_report(s: dict) -> str:
    lines = [f"files {s['files']}, true pairs {s['true_pairs']}, candidate rows {s['info']['rows']} "
             f"({s['info']['ignored_unlabelled']} with unlabelled files ignored)"]
    rows = [[t, v["predicted"], v["tp"], _f(v["precision"]), _f(v["recall"]), _f(v["f1"])] for t, v in s["tiers"].items()]
    for name in ("final", "clusters"):
        v = s[name]
        rows.append([name, v["predicted"], v["tp"], _f(v["precision"]), _f(v["recall"]), _f(v["f1"])])
    b = s["bcubed"]
    rows.append(["B-cubed", "", "", _f(b["precision"]), _f(b["recall"]), _f(b["f1"])])
    lines.append(report.table(["", "pairs", "true", "P", "R", "F1"], rows))
    if s.get("per_transform"):
        tiers = list(s["tiers"])
        rows = [[t, v["category"], v["n"], *[_f(v[f"{x}_recall"]) for x in tiers], _f(v["final_recall"]),
                 _f(v["clusters_recall"])] for t, v in s["per_transform"].items()]
        lines.append(report.table(["transform", "category", "n", *[f"{x} R" for x in tiers], "final R",
                                   "clusters R"], rows))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.eval", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="benchmarks markdown to update (section 'eval'); "
                    "default docs/benchmarks.md, not written in --score mode")
    ap.add_argument("--sets", default="all", help="comma-separated: generated and/or labelled set names "
                    f"(default all: generated,{','.join(labelled_sets())})")
    ap.add_argument("--bench-dir", default=str(transforms.DEFAULT_BENCH_DIR),
                    help="where the generated set and the pipeline outputs go (default %(default)s, $BENCH_DIR)")
    ap.add_argument("--sources", type=int, default=150, help="source photos of the generated set")
    ap.add_argument("--distractors", type=int, default=None, help="untouched other photos (default = --sources)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--preset", default=None, help="passed to the pipeline as --preset (fast, default, "
                    "high-recall, strict)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="passed to the pipeline as --set (repeatable)")
    ap.add_argument("--json", help="write every number to this JSON file")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per pipeline run")
    ap.add_argument("--no-baselines", action="store_true")
    ap.add_argument("--no-embeddings", action="store_true", help="hash baselines only (no TensorFlow)")
    ap.add_argument("--no-pipeline", action="store_true", help="baselines only")
    ap.add_argument("--score", metavar="OUT", help="score an existing output (folder, pairs.parquet or CSV "
                    "path_a,path_b) against --labels, print, and exit")
    ap.add_argument("--labels", help="labels.csv for --score (paths relative to its folder)")
    ap.add_argument("--root", help="--score: folder the output's paths are relative to, when absolute "
                    "(default: the labels' folder)")
    args = ap.parse_args(argv)

    if args.score:
        if not args.labels:
            ap.error("--score needs --labels")
        root = Path(args.root) if args.root else Path(args.labels).resolve().parent
        s = sc.score(args.score, sc.load_labels(args.labels, root=root), root=root)
        print(text_report(s))
        if args.json:
            Path(args.json).write_text(json.dumps(_jsonable(s), indent=1))
        return 0

    available = labelled_sets()
    if args.sets == "all" and not available:
        # (the generated set alone would replace the labelled rows of docs/benchmarks.md)
        log(f"error: no labelled sets under {LABELLED} (each a folder with labels.csv): set SHARED to the "
            "shared folder, or pass --sets generated to evaluate the generated set only")
        return 2
    wanted = ["generated", *available] if args.sets == "all" else [s.strip() for s in args.sets.split(",") if s.strip()]
    unknown = [s for s in wanted if s != "generated" and s not in available]
    if unknown:
        ap.error(f"unknown set(s) {unknown}; known: generated, {', '.join(available) or '(no labelled sets found)'}")
    missing = []
    if "generated" in wanted and not transforms.DEFAULT_PHOTOS.is_dir():
        missing.append(f"the photos the generated set is made from ({transforms.DEFAULT_PHOTOS})")
    weights = MODELS / EMBED_WEIGHTS
    # (the pipeline's confirm tier needs them too, unless the run is told where others are or
    # stops before it; the embedding baselines need them whatever the pipeline does)
    pipeline_needs = not args.no_pipeline and args.preset != "fast" and not any(
        o.split("=", 1)[0].strip() in ("embed.weights", "tiers") for o in args.overrides)
    baselines_need = not args.no_baselines and not args.no_embeddings
    if (pipeline_needs or baselines_need) and not weights.is_file():
        users = " and ".join(w for w, needs in (("the pipeline's confirm tier", pipeline_needs),
                                                ("the embedding baselines", baselines_need)) if needs)
        missing.append(f"the MobileNet weights {users} use ({weights})")
    if missing:
        log("error: missing " + "; ".join(missing) + ": set SHARED to the shared folder")
        return 2
    results = []
    t_all = time.perf_counter()
    for name in wanted:
        if name == "generated":
            distractors = args.sources if args.distractors is None else args.distractors
            t0 = time.perf_counter()
            root = transforms.ensure(args.bench_dir, transforms.DEFAULT_PHOTOS, args.seed, args.sources,
                                     distractors, quiet=False)
            log(f"[generated] benchmark in {root} ({time.perf_counter() - t0:.1f} s)")
        else:
            root = available[name]
        results.append(evaluate_set(name, root, args, args.overrides))
    log(f"total {time.perf_counter() - t_all:.1f} s")
    doc = args.out or str(report.DEFAULT_PATH)
    path = report.update_section(SECTION, TITLE, render(results, args, args.overrides), doc)
    log(f"wrote section '{SECTION}' of {path}")
    if args.json:
        # (where and when these numbers were made: bench.compare puts runs side by side later,
        # maybe on another machine or commit, and names each run's own)
        made = {"machine": report.machine(), "commit": report.git_rev(), "command": report.command(),
                "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
        Path(args.json).write_text(json.dumps(_jsonable({"overrides": args.overrides, "preset": args.preset, "seed": args.seed,
                                                         "sources": args.sources, "made": made,
                                                         "results": results}), indent=1))
        log(f"wrote {args.json}")
    failed = [r["set"] for r in results if r.get("run") and not r["run"]["ok"]]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
