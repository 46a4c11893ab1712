"""The accuracy harness: scorer on hand-made tables, and the transform suite's determinism."""
from __future__ import annotations

import csv
import hashlib

import numpy as np
import pandas as pd
import pytest

from bench import score as sc
from bench import transforms

# groups: g1 = {a, a2, a3} (3 true pairs), g2 = {b, b2} (1 true pair), singletons c, bad, d
LABELS = pd.DataFrame({
    "path": ["x/a.jpg", "x/a2.jpg", "x/a3.jpg", "y/b.jpg", "y/b2.jpg", "c.jpg", "bad.jpg", "d.jpg"],
    "group_id": ["g1", "g1", "g1", "g2", "g2", "g3", "CORRUPT", ""],
    "transform": ["original", "jpeg_q50", "hflip", "original", "crop_60_centre", "distractor", "", ""],
    "category": ["original", "easy", "medium", "original", "hard", "distractor", "", ""],
})


def _pairs(rows):
    return pd.DataFrame(rows, columns=["path_a", "path_b", "stage", "is_duplicate"])


def _images(clusters: dict):
    paths = list(LABELS["path"]) + ["unlabelled.jpg"]
    return pd.DataFrame({"path": paths, "cluster_id": [clusters.get(p) for p in paths],
                         "error": [None] * len(paths)})


def test_true_pairs_and_singletons():
    labels = sc.load_labels(LABELS)
    truth = sc.true_pairs(labels)
    assert truth == {("x/a.jpg", "x/a2.jpg"), ("x/a.jpg", "x/a3.jpg"), ("x/a2.jpg", "x/a3.jpg"),
                     ("y/b.jpg", "y/b2.jpg")}
    # two files both labelled CORRUPT (or with an empty group) are not a true pair
    two_bad = pd.DataFrame({"path": ["p.jpg", "q.jpg", "r.jpg", "s.jpg"], "group_id": ["corrupt", "CORRUPT", "", ""]})
    assert sc.true_pairs(sc.load_labels(two_bad)) == set()


def test_known_precision_recall_per_tier():
    pred = _pairs([
        ("x/a.jpg", "x/a2.jpg", "confirm", True),      # TP
        ("x/a.jpg", "x/a3.jpg", "confirm", False),     # alive after verify, rejected by confirm
        ("y/b.jpg", "y/b2.jpg", "verify", False),      # rejected by verify
        ("c.jpg", "d.jpg", "confirm", True),           # FP
        ("c.jpg", "x/a.jpg", "screen", False),         # candidate only
        ("c.jpg", "unlabelled.jpg", "confirm", True),  # ignored
    ])
    s = sc.score({"pairs": pred, "images": None}, LABELS)
    assert s["true_pairs"] == 4
    assert s["info"]["ignored_unlabelled"] == 1
    scr, ver, con = s["tiers"]["screen"], s["tiers"]["verify"], s["tiers"]["confirm"]
    assert (scr["predicted"], scr["tp"]) == (5, 3)
    assert scr["recall"] == pytest.approx(3 / 4) and scr["precision"] == pytest.approx(3 / 5)
    assert (ver["predicted"], ver["tp"]) == (3, 2)  # confirm rows alive; verify-rejected and screen dead
    assert con == s["final"]
    f = s["final"]
    assert (f["tp"], f["fp"], f["fn"]) == (1, 1, 3)
    assert f["precision"] == pytest.approx(0.5) and f["recall"] == pytest.approx(0.25)
    assert f["f1"] == pytest.approx(2 * 0.5 * 0.25 / 0.75)
    # per transform: the pair's transform is the non-original member's; a2-a3 is copy-vs-copy
    pt = s["per_transform"]
    assert pt["jpeg_q50"]["final_recall"] == 1.0 and pt["jpeg_q50"]["n"] == 1
    assert pt["hflip"]["final_recall"] == 0.0 and pt["hflip"]["verify_recall"] == 1.0
    assert pt["crop_60_centre"]["screen_recall"] == 1.0 and pt["crop_60_centre"]["verify_recall"] == 0.0
    assert pt["copy-vs-copy"]["n"] == 1 and pt["copy-vs-copy"]["screen_recall"] == 0.0
    assert set(s["per_category"]) == {"easy", "medium", "hard", "copy-vs-copy"}


def test_exact_copies_expand_pairs():
    # exact (a, a2) + near (a, a3): (a2, a3) is implied, with the near row's stage and verdict
    pred = _pairs([("x/a.jpg", "x/a2.jpg", "exact", True), ("x/a.jpg", "x/a3.jpg", "confirm", True),
                   ("y/b.jpg", "x/a.jpg", "verify", False)])
    s = sc.score({"pairs": pred, "images": None}, LABELS)
    assert s["final"]["tp"] == 3 and s["final"]["fp"] == 0
    assert s["info"]["implied_rows"] == 2  # (a2, a3) confirm + (a2, b) verify-rejected
    assert s["tiers"]["screen"]["predicted"] == 5 and s["tiers"]["verify"]["predicted"] == 3
    # an unlabelled exact copy links two labelled files: (u, a2) exact + (u, a3) near -> (a2, a3)
    pred = _pairs([("unlabelled.jpg", "x/a2.jpg", "exact", True), ("unlabelled.jpg", "x/a3.jpg", "confirm", True)])
    s = sc.score({"pairs": pred, "images": None}, LABELS)
    assert s["final"]["tp"] == 1 and s["info"]["ignored_unlabelled"] == 2
    # an exact group listed as a star (a-a2, a-a3) gives the missing side a2-a3
    pred = _pairs([("x/a.jpg", "x/a2.jpg", "exact", True), ("x/a.jpg", "x/a3.jpg", "exact", True)])
    assert sc.score({"pairs": pred, "images": None}, LABELS)["final"]["tp"] == 3


def test_cluster_expansion_credits_implied_pairs():
    # near (a, a2) + near (a, a3): a2-a3 is implied by the cluster, not by a pair row
    pred = _pairs([("x/a.jpg", "x/a2.jpg", "confirm", True), ("x/a.jpg", "x/a3.jpg", "confirm", True)])
    images = _images({"x/a.jpg": 7, "x/a2.jpg": 7, "x/a3.jpg": 7, "unlabelled.jpg": 7})
    s = sc.score({"pairs": pred, "images": images}, LABELS)
    assert s["final"]["recall"] == pytest.approx(2 / 4)
    assert s["clusters"]["recall"] == pytest.approx(3 / 4) and s["clusters"]["precision"] == 1.0
    assert s["per_transform"]["copy-vs-copy"]["clusters_recall"] == 1.0
    # without images.parquet the clusters are the connected components of the duplicate pairs
    s2 = sc.score({"pairs": pred, "images": None}, LABELS)
    assert s2["clusters"]["tp"] == 3
    # B-cubed: a-cluster is perfect, b/b2 are split (recall 1/2 each), everything else singleton
    assert s["bcubed"]["precision"] == 1.0
    assert s["bcubed"]["recall"] == pytest.approx((3 * 1 + 2 * 0.5 + 3 * 1) / 8)


def test_wrong_cluster_lowers_cluster_precision():
    pred = _pairs([("x/a.jpg", "c.jpg", "confirm", True)])
    images = _images({"x/a.jpg": 1, "c.jpg": 1})
    s = sc.score({"pairs": pred, "images": images}, LABELS)
    assert s["clusters"]["precision"] == 0.0 and s["clusters"]["fp"] == 1


def test_path_normalisation_and_order(tmp_path):
    # absolute paths under the set root, './' prefixes, backslashes, reversed order, duplicates
    root = tmp_path / "set"
    pred = _pairs([
        (str(root / "x/a2.jpg"), "./x/a.jpg", "confirm", True),
        ("x\\a.jpg", "x/a2.jpg", "confirm", True),
        ("y//b2.jpg", "y/./b.jpg", "confirm", True),
    ])
    s = sc.score({"pairs": pred, "images": None}, LABELS, root=root)
    assert s["final"]["tp"] == 2 and s["final"]["fp"] == 0
    # the pipeline run on the parent folder: every path carries a leading "set/"
    pred2 = _pairs([("set/x/a.jpg", "set/x/a2.jpg", "confirm", True), ("set/y/b.jpg", "set/y/b2.jpg", "screen", True),
                    ("set/c.jpg", "set/d.jpg", "screen", False)])
    s2 = sc.score({"pairs": pred2, "images": None}, LABELS)
    assert s2["info"]["path_prefix_fixed"] and s2["final"]["tp"] == 2


def test_external_csv_and_parquet(tmp_path):
    labels_csv = tmp_path / "labels.csv"
    LABELS.to_csv(labels_csv, index=False)
    ext = tmp_path / "pred.csv"
    ext.write_text("path_a,path_b\nx/a.jpg,x/a3.jpg\nx/a3.jpg,x/a2.jpg\nc.jpg,d.jpg\n")
    s = sc.score(ext, sc.load_labels(labels_csv))
    assert (s["final"]["tp"], s["final"]["fp"]) == (2, 1)
    assert s["tiers"] == {}  # a plain list of duplicates has no tiers
    assert s["clusters"]["tp"] == 3  # a-a2 implied by the CSV's pairs
    noheader = tmp_path / "noheader.csv"
    noheader.write_text("x/a.jpg,x/a3.jpg\n")
    assert sc.score(noheader, sc.load_labels(labels_csv))["final"]["tp"] == 1
    out = tmp_path / "out"
    out.mkdir()
    _pairs([("x/a.jpg", "x/a2.jpg", "verify", True), ("x/a.jpg", "x/a3.jpg", "verify", False)]).to_parquet(
        out / "pairs.parquet")
    _images({"x/a.jpg": 0, "x/a2.jpg": 0}).to_parquet(out / "images.parquet")
    s = sc.score(out, sc.load_labels(labels_csv))
    assert s["tiers"]["screen"]["tp"] == 2 and s["tiers"]["verify"]["tp"] == 1
    assert "confirm" not in s["tiers"] and s["clusters"]["tp"] == 1


def test_threshold_sweep():
    scores = np.array([0.9, 0.8, 0.8, 0.5, 0.1])
    is_true = np.array([1, 1, 0, 1, 0], bool)
    th, P, R = sc.threshold_sweep(scores, is_true, total_true=4)
    assert list(th) == [0.9, 0.8, 0.5, 0.1]  # ties are cut together
    assert P[1] == pytest.approx(2 / 3) and R[2] == pytest.approx(3 / 4)
    assert sc.at_precision(th, P, R, 0.99)["threshold"] == 0.9
    best = sc.best_f1(th, P, R)
    assert best["threshold"] == 0.5 and best["f1"] == pytest.approx(2 * 0.75 * 0.75 / 1.5)
    d_th, d_P, _ = sc.threshold_sweep(np.array([0., 3., 12.]), np.array([1, 1, 0], bool), 2, higher_is_closer=False)
    assert list(d_th) == [0, 3, 12] and d_P[1] == 1.0


def test_no_pairs_and_no_predictions_are_stated_as_such():
    """A set of fewer than two readable files has no pair to sweep (it raised IndexError and the
    whole `make eval` report was lost), and a run that predicts nothing has no precision: "–",
    not the 1.0 that read as perfect."""
    th, P, R = sc.threshold_sweep(np.zeros(0), np.zeros(0, bool), 0)
    assert len(th) == len(P) == len(R) == 0
    assert np.isnan(sc.best_f1(th, P, R)["precision"]) and np.isnan(sc.at_precision(th, P, R)["precision"])
    none = sc.prf(set(), {("a", "b")})
    assert np.isnan(none["precision"]) and none["recall"] == 0.0 and none["f1"] == 0.0
    nothing = sc.prf(set(), set())
    assert np.isnan(nothing["precision"]) and np.isnan(nothing["f1"])
    wrong = sc.prf({("a", "c")}, {("a", "b")})
    assert wrong["precision"] == 0.0 and wrong["f1"] == 0.0
    from bench import eval as ev
    from bench.report import table
    assert ev._f(none["precision"]) == "–" and ev._f(0.5) == "0.500"
    assert "| – |" in table(["P"], [[float("nan")]])  # (bench.compare's tables: it printed "nan")


def test_eval_stops_before_any_work_when_the_shared_data_is_missing(tmp_path, monkeypatch, capsys):
    """No labelled sets (SHARED wrong): exit 2 saying so, nothing written (the generated set alone
    replaced the labelled rows of docs/benchmarks.md, exit 0); no photos or no weights: exit 2
    naming them (a FileNotFoundError or WeightsError traceback once the pipeline had run)."""
    from bench import eval as ev
    doc = tmp_path / "benchmarks.md"
    monkeypatch.setattr(ev, "LABELLED", tmp_path / "no-labelled")
    assert ev.main(["--out", str(doc), "--bench-dir", str(tmp_path / "b")]) == 2
    assert "no labelled sets under" in capsys.readouterr().err and not doc.exists()
    monkeypatch.setattr(ev.transforms, "DEFAULT_PHOTOS", tmp_path / "no-photos")
    monkeypatch.setattr(ev, "MODELS", tmp_path / "no-models")
    assert ev.main(["--sets", "generated", "--out", str(doc), "--bench-dir", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "no-photos") in err and str(tmp_path / "no-models") in err and not doc.exists()
    assert not (tmp_path / "b").exists()
    # the pipeline's confirm tier needs the weights too: --no-embeddings does not make do without
    assert ev.main(["--sets", "generated", "--no-embeddings", "--out", str(doc),
                    "--bench-dir", str(tmp_path / "b")]) == 2
    assert "weights the pipeline's confirm tier use" in capsys.readouterr().err and not doc.exists()


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((folder / "images").iterdir())}


def test_transform_suite_is_deterministic(tmp_path, photos_dir):
    a = transforms.generate(tmp_path / "a", photos_dir, seed=3, sources=2, distractors=1)
    b = transforms.generate(tmp_path / "b", photos_dir, seed=3, sources=2, distractors=1)
    assert a.read_bytes() == b.read_bytes()
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    c = transforms.generate(tmp_path / "c", photos_dir, seed=4, sources=2, distractors=1)
    assert c.read_bytes() != a.read_bytes()
    rows = list(csv.DictReader(a.open()))
    assert list(rows[0]) == transforms.LABEL_COLUMNS
    files = {p.relative_to(tmp_path / "a").as_posix() for p in (tmp_path / "a" / "images").iterdir()}
    assert {r["path"] for r in rows} == files
    groups = {}
    for r in rows:
        groups.setdefault(r["group_id"], []).append(r)
    assert len(groups) == 3
    for g, members in groups.items():
        kinds = [m["transform"] for m in members]
        if g.startswith("d"):
            assert kinds == ["distractor"]
        else:
            assert kinds.count("original") == 1 and 5 <= len(kinds) <= 7
            assert len(set(kinds)) == len(kinds)
            for m in members:
                assert m["category"] == ("original" if m["transform"] == "original"
                                         else transforms.BY_NAME[m["transform"]].category)
    exact = [r for r in rows if r["transform"] == "exact_copy"]
    for r in exact:
        orig = next(m for m in groups[r["group_id"]] if m["transform"] == "original")
        assert (tmp_path / "a" / r["path"]).read_bytes() == (tmp_path / "a" / orig["path"]).read_bytes()


def test_every_transform_renders_and_the_plan_is_balanced(photo_paths):
    src = photo_paths[0]
    for t in transforms.TRANSFORMS:
        data, ext, _ = transforms.render(src, t.name, seed=0, group="g0000")
        assert len(data) > 500 and ext in (".jpg", ".png", ".webp")
    _, chosen, _ = transforms.plan(photo_paths, seed=0, sources=150, distractors=150)
    counts = pd.Series([n for c in chosen for n in c]).value_counts()
    assert set(counts.index) == {t.name for t in transforms.TRANSFORMS}
    assert counts.max() - counts.min() <= 3
    assert all(4 <= len(c) <= 6 for c in chosen)
