"""The review report on a real run (real decoders, ORB, MobileNet): files, data, ranking, escaping."""
from __future__ import annotations

import io
import json
import re
from pathlib import Path
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import EVIL_FOLDER
from pipeline import verify
from pipeline.config import Config, load_config
from pipeline.report import closeness_order, script_json, write_report
from pipeline.results import load_run
from pipeline.run import image_ids

DATA_PREFIX = "window.DEDUPE_REPORT = "


def read_data(report_dir):
    text = (report_dir / "data.js").read_text(encoding="utf-8")
    assert text.startswith(DATA_PREFIX) and text.rstrip().endswith(";")
    return json.loads(text[len(DATA_PREFIX):].rstrip().rstrip(";"))


def test_report_files_and_every_cluster(review_run):
    report = review_run / "report"
    assert 'url=report/index.html' in (review_run / "report.html").read_text()
    for name in ("index.html", "data.js", "app.js", "style.css"):
        assert (report / name).is_file(), name
    hidden = sorted(p.name for p in review_run.iterdir() if p.name.startswith("."))
    assert hidden == [".dedupe", ".dedupe.lock"]  # generations and the run lock; no temp folders left
    assert not [p for p in (review_run / "report").iterdir() if p.name.startswith(".")]
    run = load_run(review_run)
    data = read_data(report)
    members = run.clusters(keep="largest_pixels")
    assert len(data["clusters"]) == members["cluster_id"].nunique() >= 4
    ids = [row[0] for row in data["images"]]
    # clusters compared by their members (the cluster_id in images.parquet may be rounded by an
    # older writer; the report takes the run's ids from memory)
    expected = {frozenset(g["image_id"].astype(str)): str(g.loc[g["keeper"], "image_id"].item())
                for _, g in members.groupby("cluster_id")}
    got = {frozenset(ids[i] for i in c[1]): ids[c[2]] for c in data["clusters"]}
    assert got == expected
    # clusters largest first; every duplicate pair listed under its cluster
    sizes = [len(c[1]) for c in data["clusters"]]
    assert sizes == sorted(sizes, reverse=True)
    assert sum(len(c[3]) for c in data["clusters"]) == int(run.pairs["is_duplicate"].sum())
    # one thumbnail per shown decodable image; the broken file is listed under errors without one
    for row in data["images"]:
        assert row[8] == (row[7] is None) == (report / "thumbs" / f"{row[0]}.jpg").is_file(), row
    assert [data["images"][i][1] for i in data["errors"]] == ["edits/broken.jpg"]


def test_cosine_and_missing_values_are_kept_as_numbers_or_null(review_run):
    data = read_data(review_run / "report")
    pairs = data["pairs"]
    assert any(p[6] is not None for p in pairs) and any(p[6] is None for p in pairs)
    assert all(p[6] is None or isinstance(p[6], float) for p in pairs)
    assert "NaN" not in (review_run / "report" / "data.js").read_text()


def test_closest_rejected_are_ranked_by_closeness(review_run):
    run = load_run(review_run)
    data = read_data(review_run / "report")
    rejected = [data["pairs"][i] for i in data["rejected"]]
    assert len(rejected) == int((~run.pairs["is_duplicate"]).sum()) > 10
    assert not any(p[9] for p in rejected)
    # cosine pairs first (by cosine), then ORB-only pairs by inliers, then hash-only by distance
    keys = [(0, -p[6], 0, 0) if p[6] is not None else (1, 0, -p[4], p[2]) if p[4] is not None else (2, 0, 0, p[2])
            for p in rejected]
    assert keys == sorted(keys)


def test_closeness_order_definition():
    pairs = pd.DataFrame({
        "cosine": pd.array([None, 0.5, None, 0.7, None, None], dtype="Float32"),
        "orb_inliers": pd.array([9, 3, None, 2, 9, 12], dtype="Int32"),
        "hash_distance": np.array([4, 9, 1, 9, 2, 9], dtype=np.int16),
    })
    assert closeness_order(pairs).tolist() == [3, 1, 5, 4, 0, 2]
    # a cluster's byte copies (no tier's numbers, hash distance 0) come first: they were last
    pairs["stage"] = ["verify", "confirm", "exact", "confirm", "verify", "verify"]
    assert closeness_order(pairs).tolist() == [2, 3, 1, 5, 4, 0]


def test_drawn_pairs_show_the_runs_evidence(review_run):
    """Drawings exist for the drawn pairs, and the recomputed ORB numbers are the run's."""
    run = load_run(review_run)
    data = read_data(review_run / "report")
    drawn = [p for p in data["pairs"] if p[11]]
    assert drawn and all((review_run / "report" / "pairs" / p[11]).is_file() for p in drawn)
    assert all(p[4] is not None for p in drawn)  # only pairs the verify tier saw are drawn
    cfg = Config()
    verified = run.pairs[run.pairs["orb_inliers"].notna()]
    for r in verified.itertuples():  # (each orientation the tier matches is tried for the run's numbers)
        expect = (int(r.orb_matches), int(r.orb_inliers))
        ev = verify.pair_evidence(str(run.root / r.path_a), str(run.root / r.path_b), cfg, expect=expect)
        assert (ev["matches"], ev["inliers"]) == expect, (r.path_a, r.path_b)
        without = verify.pair_evidence(str(run.root / r.path_a), str(run.root / r.path_b), cfg)
        assert without["inliers"] >= r.orb_inliers  # (else the orientation with the most inliers)


def test_user_controlled_text_is_escaped(review_run):
    index = (review_run / "report" / "index.html").read_text(encoding="utf-8")
    data_js = (review_run / "report" / "data.js").read_text(encoding="utf-8")
    assert "</" not in data_js and "<img" not in data_js and "<" not in data_js
    assert EVIL_FOLDER not in index  # the root and counts are autoescaped; paths come from data.js
    data = read_data(review_run / "report")
    assert any(row[1].startswith(EVIL_FOLDER + "/") for row in data["images"])  # the text survives intact
    assert json.loads(script_json({"p": "</script><b>&\u2028"})) == {"p": "</script><b>&\u2028"}
    assert "</" not in script_json({"p": "</script>"})


def test_data_js_is_written_in_pieces_that_join_to_the_one_piece_text():
    """data.js is streamed (`iter_script_json`: long lists a few rows at a time, so the driver
    never holds the whole text): the pieces join to exactly the text of one json.dumps, escapes
    included, wherever the lists are cut."""
    from pipeline.report import iter_script_json
    data = {"meta": {"root": "/x/</script>", "n": None, "ok": True},
            "images": [[str(2**62 + i), f"a/é{i}<b>.jpg", i, None] for i in range(7)],
            "pairs": [[i, i + 1, 0.5, "inliers >= 12 & \u2028\u2029", False] for i in range(10)],
            "clusters": [["1", [0, 1], 0, []]], "rejected": [], "errors": [],
            "counts": {1: 2, "files": 3, None: 4, 2.5: 5}}  # (json.dumps turns keys into strings)
    one = json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    for ch, esc in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
                    ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        one = one.replace(ch, esc)
    for rows in (1, 2, 3, 6, 7, 9, 10, 11, 4096):
        pieces = list(iter_script_json(data, rows))
        assert "".join(pieces) == one, rows
        if rows < 7:  # a long list is cut: no piece holds all of it
            assert max(len(p) for p in pieces) < len(one) // 2
    assert script_json(data) == one and json.loads(one)["pairs"] == data["pairs"]
    assert json.loads(one)["counts"] == {"1": 2, "files": 3, "null": 4, "2.5": 5}


def test_report_from_the_parquet_outputs_and_limits(review_run, tmp_path):
    """`write_report` also works from a finished run's files (abs paths rebuilt from the root),
    and the drawing caps hold; writing again replaces the folder."""
    out = tmp_path / "out"
    out.mkdir()
    for name in ("images.parquet", "pairs.parquet", "run.json"):
        shutil.copy(review_run / name, out / name)
    run = load_run(out)
    cfg = load_config(None, ["report.draw_pairs=2", "report.draw_rejected=1", "report.rejected_pairs=5",
                             "report.page_size=2", "report.keep=shortest_path"])
    write_report(out, run.images, run.pairs.drop(columns=["rule"]), run.manifest, cfg)
    data = read_data(out / "report")
    assert len(list((out / "report" / "pairs").iterdir())) == 3
    assert len(data["rejected"]) == 5 and data["meta"]["page_size"] == 2
    assert {p[8] for p in data["pairs"]} <= set(data["rules"])  # rule codes derived from the reasons
    members = run.clusters(keep="shortest_path")
    keepers = set(members.loc[members["keeper"], "image_id"].astype(str))
    assert {data["images"][c[2]][0] for c in data["clusters"]} == keepers
    (out / "report" / "thumbs" / "stale.jpg").write_bytes(b"x")
    write_report(out, run.images, run.pairs, run.manifest, cfg)
    assert not (out / "report" / "thumbs" / "stale.jpg").exists()
    assert sorted(p.name for p in out.iterdir()) == ["images.parquet", "pairs.parquet", "report", "report.html",
                                                     "run.json"]


def test_a_runs_report_is_the_one_its_parquet_outputs_make(review_run, tmp_path):
    """A run hands the report only the pair columns it reads (report.PAIR_COLUMNS) and the listed
    images' paths are looked up by position: the report it writes is the one `write_report` makes
    from the finished run's files (every column), row for row, with the same thumbnails and
    drawings indexed."""
    out = tmp_path / "out"
    out.mkdir()
    for name in ("images.parquet", "pairs.parquet", "run.json"):
        shutil.copy(review_run / name, out / name)
    run = load_run(out)
    write_report(out, run.images, run.pairs, run.manifest)
    ran, rebuilt = read_data(review_run / "report"), read_data(out / "report")
    for data in (ran, rebuilt):
        data["meta"].pop("generated")
    assert ran["pairs"] and ran["clusters"] and any(p[11] for p in ran["pairs"])
    assert rebuilt == ran
    for index in ("thumbs.json", "drawings.json"):
        assert json.loads((out / "report" / index).read_text()) == json.loads((review_run / "report" / index).read_text())


def test_the_reports_keepers_follow_a_preferred_folder_given_as_an_absolute_path(review_run, tmp_path):
    """The report reads only the image columns it needs (report.IMAGE_COLUMNS, and of them per
    use): keep=preferred_folder with an absolute prefix still compares the members' abs paths."""
    out = tmp_path / "out"
    out.mkdir()
    for name in ("images.parquet", "pairs.parquet", "run.json"):
        shutil.copy(review_run / name, out / name)
    run = load_run(out)
    prefer = str(Path(run.manifest["root"]) / "edits")
    cfg = Config()
    cfg.report.keep, cfg.report.prefer = "preferred_folder", [prefer]
    write_report(out, run.images, run.pairs, run.manifest, cfg)
    data = read_data(out / "report")
    shown = {data["images"][c[2]][0] for c in data["clusters"]}

    def keepers(**keep):
        members = run.clusters(**keep)
        return set(members.loc[members["keeper"], "image_id"].astype(str))
    assert shown == keepers(keep="preferred_folder", prefer=[prefer])
    assert shown != keepers(keep="largest_pixels")  # (the folder decides some cluster's keeper)
    assert all(data["images"][c[2]][1].startswith("edits/") for c in data["clusters"]
               if any(data["images"][m][1].startswith("edits/") for m in c[1]))


@pytest.mark.parametrize("tiers", ["screen", "verify"])
def test_report_of_earlier_tiers(review_data, tmp_path, tiers):
    from pipeline.cli import main
    out = tmp_path / "out"
    assert main(["dedupe", str(review_data), "--out", str(out), "--tiers", tiers, "--scheduler", "sync",
                 "--quiet"]) == 0
    data = read_data(out / "report")
    assert data["clusters"]
    assert all(p[6] is None for p in data["pairs"])  # no cosine without the confirm tier
    if tiers == "screen":
        assert not (out / "report" / "pairs").exists() or not list((out / "report" / "pairs").iterdir())


def test_report_command_rebuilds_with_overrides(review_run, tmp_path):
    from pipeline.cli import main
    out = tmp_path / "out"
    out.mkdir()
    for name in ("images.parquet", "pairs.parquet", "run.json"):
        shutil.copy(review_run / name, out / name)
    assert main(["report", str(out), "--set", "report.keep=newest", "--set", "report.draw_pairs=0",
                 "--set", "report.draw_rejected=0"]) == 0
    data = read_data(out / "report")
    assert data["meta"]["keep"] == "newest" and not list((out / "report" / "pairs").iterdir())
    assert main(["report", str(out), "--set", "screen.max_distance=3"]) == 2
    assert main(["report", str(out), "--set", "report.keep=biggest"]) == 2
    assert main(["report", str(tmp_path / "nothing")]) == 2
    # while a run holds OUT's lock (it would publish over the rebuilt report): refused, report kept
    from pipeline import outdir
    page = (out / "report" / "data.js").read_bytes()
    with outdir.locked(out):
        assert main(["report", str(out), "--set", "report.keep=oldest"]) == 2
    assert (out / "report" / "data.js").read_bytes() == page


def test_report_of_the_scale_benchmarks_synthetic_run(photo_paths, tmp_path):
    """bench/report_scale.py's synthetic frames (small here) go through the report writer."""
    from bench.report_scale import synthetic_run
    images, pairs, manifest = synthetic_run(400, 40, photo_paths[:20], rejected=300)
    cfg = load_config(None, ["report.draw_pairs=2", "report.draw_rejected=1", "report.rejected_pairs=50"])
    write_report(tmp_path, images, pairs, manifest, cfg)
    data = read_data(tmp_path / "report")
    assert len(data["clusters"]) == 40
    assert sum(len(c[1]) for c in data["clusters"]) == int((images["cluster_id"] >= 0).sum())
    assert len(data["errors"]) == int(images["error"].notna().sum())
    assert len(data["rejected"]) == 50
    # (its ORB numbers are made up: a drawing whose matches are not the pair's numbers is not made)
    files = sorted(p.name for p in (tmp_path / "report" / "pairs").iterdir())
    assert files == sorted(p[11] for p in data["pairs"] if p[11]) and len(files) <= 3


def test_a_rebuild_reuses_the_thumbnails_of_unchanged_files(review_run, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    for name in ("images.parquet", "pairs.parquet", "run.json"):
        shutil.copy(review_run / name, out / name)
    assert main_report(out) == 0
    thumbs = sorted((out / "report" / "thumbs").iterdir())
    marked = thumbs[0]
    marked.write_bytes(marked.read_bytes() + b"reused")  # a made thumbnail would not end like this
    assert main_report(out) == 0
    assert (out / "report" / "thumbs" / marked.name).read_bytes().endswith(b"reused")
    assert sorted(p.name for p in (out / "report" / "thumbs").iterdir()) == [p.name for p in thumbs]
    assert main_report(out, "report.thumb_size=96") == 0  # another size: made again
    with Image.open(out / "report" / "thumbs" / marked.name) as im:
        assert max(im.size) == 96


def main_report(out, *overrides):
    from pipeline.cli import main
    return main(["report", str(out), *[a for o in overrides for a in ("--set", o)]])


def _a_report_and_two_folders(review_run, tmp_path):
    """The review run, its report written into tmp_path/first, and empty folders second and third."""
    run = load_run(review_run)
    folders = tmp_path / "first", tmp_path / "second", tmp_path / "third"
    for d in folders:
        d.mkdir()
    write_report(folders[0], run.images, run.pairs, run.manifest)
    return run, folders


def test_a_new_run_reuses_the_last_reports_thumbnails_and_drawings(review_run, tmp_path):
    """Each run writes its report into a new generation folder: thumbnails and match drawings of
    unchanged bytes (and, for drawings, unchanged verify settings) come from the last report."""
    run, (first, second, third) = _a_report_and_two_folders(review_run, tmp_path)
    thumb = sorted((first / "report" / "thumbs").iterdir())[0]
    drawing = sorted((first / "report" / "pairs").iterdir())[0]
    for f in (thumb, drawing):  # a file made again would not end like this
        f.write_bytes(f.read_bytes() + b"reused")
    write_report(second, run.images, run.pairs, run.manifest, reuse_from=first / "report")
    assert (second / "report" / "thumbs" / thumb.name).read_bytes().endswith(b"reused")
    assert (second / "report" / "pairs" / drawing.name).read_bytes().endswith(b"reused")
    assert read_data(second / "report")["pairs"] == read_data(first / "report")["pairs"]
    cfg = load_config(None, ["verify.ratio=0.7"])  # drawings depend on the verify settings
    write_report(third, run.images, run.pairs, run.manifest, cfg=cfg, reuse_from=first / "report")
    assert (third / "report" / "thumbs" / thumb.name).read_bytes().endswith(b"reused")
    # (not reused: drawn again, or, as here, where the pair's numbers are another setting's and
    # the matches found under this one are not them, not drawn: `draw_pair`)
    redrawn = third / "report" / "pairs" / drawing.name
    assert not redrawn.exists() or not redrawn.read_bytes().endswith(b"reused")
    # and on the pair's ORB numbers, which choose what is drawn (a release that re-scored the
    # pair), and on the code that scores and draws
    drawn = json.loads((first / "report" / "drawings.json").read_text())
    a, b = (int(x) for x in re.fullmatch(r"(-?\d+)-(-?\d+)", drawing.stem).groups())
    rescored = run.pairs.copy()
    at = ((rescored["image_id_a"] == a) & (rescored["image_id_b"] == b)).to_numpy()
    assert at.sum() == 1
    rescored.loc[at, "orb_inliers"] += 1
    fourth = tmp_path / "fourth"
    fourth.mkdir()
    write_report(fourth, run.images, rescored, run.manifest, reuse_from=first / "report")
    redrawn = fourth / "report" / "pairs" / drawing.name
    assert not redrawn.exists() or not redrawn.read_bytes().endswith(b"reused")
    again = json.loads((fourth / "report" / "drawings.json").read_text())
    assert again.get(drawing.name) != drawn[drawing.name]
    assert {k: v for k, v in again.items() if k != drawing.name} == {k: v for k, v in drawn.items() if k != drawing.name}


def test_a_release_that_decodes_or_shrinks_differently_makes_the_thumbnails_again(review_run, tmp_path, monkeypatch):
    """A thumbnail is reused on its bytes, its size and the code and libraries that made it (this
    module's and the ORB features' decode, `report._thumb_code`): a fix there shows on every
    thumbnail, not only on those of files that changed."""
    from pipeline import catalog
    run, (first, second, third) = _a_report_and_two_folders(review_run, tmp_path)
    thumb = sorted((first / "report" / "thumbs").iterdir())[0]
    thumb.write_bytes(thumb.read_bytes() + b"reused")  # a made thumbnail would not end like this
    made = json.loads((first / "report" / "thumbs.json").read_text())
    real = catalog.code_fingerprint
    monkeypatch.setattr(catalog, "code_fingerprint", lambda kind: real(kind) + ("x" if kind == "orb_features" else ""))
    write_report(second, run.images, run.pairs, run.manifest, reuse_from=first / "report")
    assert not (second / "report" / "thumbs" / thumb.name).read_bytes().endswith(b"reused")
    again = json.loads((second / "report" / "thumbs.json").read_text())
    assert again.keys() == made.keys() and all(again[k] != made[k] for k in made)
    monkeypatch.setattr(catalog, "code_fingerprint", real)  # the same code again: reused
    write_report(third, run.images, run.pairs, run.manifest, reuse_from=first / "report")
    assert (third / "report" / "thumbs" / thumb.name).read_bytes().endswith(b"reused")
    assert json.loads((third / "report" / "thumbs.json").read_text()) == made


def test_drawings_go_one_per_cluster_first():
    """report.draw_pairs is spent on each cluster's first ORB-seen pair (page order), then each
    cluster's second, ...; rejected drawings come after and only for pairs ORB saw."""
    from pipeline.config import ReportConfig
    from pipeline.report import _draw_list
    orb = [0, 0, 0, None, 0, 0, 0, 0, None, 0]  # p[4] (ORB inliers): None = ORB never saw the pair
    data = {"pairs": [[0, 1, 3, None if v is None else 10, v] for v in orb],  # (p[3]: its matches)
            "clusters": [["c1", [], None, [0, 1, 2]], ["c2", [], None, [3, 4]], ["c3", [], None, [5]]],
            "rejected": [8, 9, 7]}
    assert _draw_list(data, ReportConfig(draw_pairs=4, draw_rejected=5)) == [0, 4, 5, 1, 9, 7]
    assert _draw_list(data, ReportConfig(draw_pairs=2, draw_rejected=1)) == [0, 4, 9]
    assert _draw_list(data, ReportConfig(draw_pairs=100, draw_rejected=0)) == [0, 4, 5, 1, 2]
    assert _draw_list(data, ReportConfig(draw_pairs=0, draw_rejected=0)) == []


def test_a_run_into_a_copied_out_reuses_its_report(review_data, tmp_path):
    """OUT copied with its links followed (cp -r, shutil.copytree) holds a plain report/ folder:
    a run into the copy still reuses its thumbnails (the screen-only tiers keep this quick)."""
    from pipeline.cli import main
    first = tmp_path / "first"
    assert main(["dedupe", str(review_data), "--out", str(first), "--tiers", "screen", "--scheduler", "sync",
                 "--quiet", "--no-catalog"]) == 0
    copy = tmp_path / "copy"
    shutil.copytree(first, copy)
    assert not (copy / "report").is_symlink() and (copy / "report" / "thumbs").is_dir()
    marked = sorted((copy / "report" / "thumbs").iterdir())[0]
    marked.write_bytes(marked.read_bytes() + b"reused")  # a made thumbnail would not end like this
    assert main(["dedupe", str(review_data), "--out", str(copy), "--tiers", "screen", "--scheduler", "sync",
                 "--quiet", "--no-catalog"]) == 0
    assert (copy / "report").is_symlink()  # the copy now has the usual layout again
    assert (copy / "report" / "thumbs" / marked.name).read_bytes().endswith(b"reused")


def _counting_make_thumb(monkeypatch):
    """Record the files whose report thumbnail was made by decoding them again (make_thumb)."""
    from pipeline import report
    decoded = []
    real = report.make_thumb

    def counted(abs_path, size):
        decoded.append(str(abs_path))
        return real(abs_path, size)
    monkeypatch.setattr(report, "make_thumb", counted)
    return decoded


@pytest.mark.parametrize("catalog", [False, True])
def test_thumbnails_come_from_the_verify_tiers_decode(review_data, tmp_path, monkeypatch, catalog):
    """Every shown image the verify tier decoded gets its thumbnail from that decode (its feature
    row), not from a second decode: make_thumb runs only for images without a feature row (errors
    aside, none here: exact copies share their content's row). The thumbnail is the one make_thumb
    gives, to the eye (same size and orientation; 4 x 4 means within a few levels)."""
    from pipeline.cli import main
    from pipeline.report import make_thumb
    decoded = _counting_make_thumb(monkeypatch)
    out = tmp_path / "out"
    assert main(["dedupe", str(review_data), "--out", str(out), "--tiers", "verify", "--scheduler", "sync",
                 "--quiet", *([] if catalog else ["--no-catalog"])]) == 0
    run = load_run(out)
    data = read_data(out / "report")
    shown = [row for row in data["images"] if row[7] is None]
    verified = run.pairs[run.pairs["orb_inliers"].notna()]
    had_features = set(verified["image_id_a"].astype(str)) | set(verified["image_id_b"].astype(str))
    assert len(had_features) >= 10 and all(row[8] for row in shown)  # every shown image has one
    path_of = dict(zip(run.images["image_id"].astype(str), run.images["path"]))
    sha_of = dict(zip(run.images["image_id"].astype(str), run.images["sha256"]))
    with_row = {sha_of[i] for i in had_features}
    assert not [p for p in decoded if any(p.endswith(path_of[i]) for i in had_features)]
    # an image whose content never reached the verify tier is still decoded for its thumbnail
    assert len(decoded) == sum(sha_of[row[0]] not in with_row for row in shown)
    for row in shown:
        if row[0] not in had_features:
            continue
        thumb = out / "report" / "thumbs" / f"{row[0]}.jpg"
        ref = tmp_path / "ref.jpg"
        ref.write_bytes(make_thumb(str(review_data / path_of[row[0]]), 160))
        with Image.open(thumb) as a, Image.open(ref) as b:
            assert abs(a.size[0] - b.size[0]) <= 1 and abs(a.size[1] - b.size[1]) <= 1 and max(a.size) == 160
            # (resampled twice, 384 px then 160, fine texture differs by a few levels pixel by
            # pixel: compare what the eye sees, 4 x 4 pixel means, and the colour per channel)
            small = (b.size[0] // 4, b.size[1] // 4)
            a, b = a.convert("RGB"), b.convert("RGB")
            sa = np.asarray(a.resize(small, Image.Resampling.BOX), dtype=np.float64)
            sb = np.asarray(b.resize(small, Image.Resampling.BOX), dtype=np.float64)
            assert np.abs(sa - sb).mean() < 3.0, row[1]
            assert np.abs(sa.mean(axis=(0, 1)) - sb.mean(axis=(0, 1))).max() < 1.5, row[1]


def test_a_catalog_rerun_with_another_thumb_size_decodes_again(review_data, tmp_path, monkeypatch):
    """The feature rows a catalog keeps hold thumbnails of the size they were made for: a re-run
    with another report.thumb_size (same features, reused) makes its thumbnails from the files."""
    from pipeline.cli import main
    out = tmp_path / "out"
    args = ["dedupe", str(review_data), "--out", str(out), "--tiers", "verify", "--scheduler", "sync", "--quiet"]
    assert main(args) == 0
    (out / "report").unlink()  # (a link to the generation's report): no earlier report to reuse
    decoded = _counting_make_thumb(monkeypatch)
    assert main([*args, "--set", "report.thumb_size=96", "--set", "decide.accept_inliers=16"]) == 0
    shown = [row for row in read_data(out / "report")["images"] if row[7] is None]
    assert shown and all(row[8] for row in shown) and len(decoded) == len(shown)
    for row in shown:
        with Image.open(out / "report" / "thumbs" / f"{row[0]}.jpg") as im:
            assert max(im.size) == 96


@pytest.mark.parametrize("corrupt", [False, True])
def test_a_new_out_beside_a_shared_catalog_takes_thumbnails_from_it(review_data, tmp_path, monkeypatch, corrupt):
    """A run into a new OUT that reuses every pair from a shared catalog has no earlier report:
    its thumbnails and drawings still come from the feature rows the catalog keeps (no file
    decoded again, no ORB recomputed), as in the run that made them. A catalog part whose bytes
    are no longer those it lists is not used: its images are decoded instead, and the report is
    complete all the same (these few images make one part)."""
    from pipeline.cli import main
    shared = tmp_path / "catalog"
    args = ["--tiers", "verify", "--scheduler", "sync", "--quiet", "--catalog", str(shared)]
    assert main(["dedupe", str(review_data), "--out", str(tmp_path / "first"), *args]) == 0
    first_decoded = _counting_make_thumb(monkeypatch)  # (counts from here: the second run only)
    parts = sorted(shared.glob("features/orb/*/*/*.parquet"))
    assert parts
    if corrupt:  # same size, one byte changed: only the checksum tells
        data = bytearray(parts[0].read_bytes())
        data[len(data) // 2] ^= 0xFF
        parts[0].write_bytes(bytes(data))
    drawn_again = []
    real_evidence = verify.pair_evidence
    monkeypatch.setattr(verify, "pair_evidence", lambda *a, **k: drawn_again.append(a) or real_evidence(*a, **k))
    out = tmp_path / "second"
    assert main(["dedupe", str(review_data), "--out", str(out), *args]) == 0
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["reuse"]["verify"]["pairs_verified"] == 0  # every pair from the catalog
    first = read_data(tmp_path / "first" / "report")
    data = read_data(out / "report")
    shown = [row for row in data["images"] if row[7] is None]
    assert shown and all(row[8] for row in shown)  # every shown image has its thumbnail
    run = load_run(out)
    verified = run.pairs[run.pairs["orb_inliers"].notna()]
    had_features = set(verified["image_id_a"].astype(str)) | set(verified["image_id_b"].astype(str))
    path_of = dict(zip(run.images["image_id"].astype(str), run.images["path"]))
    from_features = [p for p in first_decoded if any(p.endswith(path_of[i]) for i in had_features)]
    if not corrupt:
        assert not from_features and not drawn_again
        assert len([p for p in data["pairs"] if p[11]]) == len([p for p in first["pairs"] if p[11]])
        for row in shown:  # the very thumbnails the first run wrote
            name = f"{row[0]}.jpg"
            assert (out / "report" / "thumbs" / name).read_bytes() == \
                (tmp_path / "first" / "report" / "thumbs" / name).read_bytes()
    else:  # the changed part's images were decoded and its drawings' features computed again
        assert len(parts) == 1 and len(from_features) == len(had_features) and drawn_again
        assert len([p for p in data["pairs"] if p[11]]) == len([p for p in first["pairs"] if p[11]])


def test_a_run_that_compacts_its_own_parts_still_reports_from_them(review_data, tmp_path, monkeypatch):
    """A commit that compacts the feature parts this run wrote leaves them unnamed by any manifest;
    they stay until the next commit, because this run's report reads its thumbnails and keypoints
    from them after the commit (before, they were removed at once and every image was decoded)."""
    from pipeline import catalog
    from pipeline.cli import main
    monkeypatch.setattr(catalog, "COMPACT_MAX_PARTS", 0)  # compact whatever there is
    decoded = _counting_make_thumb(monkeypatch)
    out = tmp_path / "out"
    args = ["dedupe", str(review_data), "--out", str(out), "--tiers", "verify", "--scheduler", "sync", "--quiet"]
    assert main(args) == 0
    manifest = json.loads((out / "run.json").read_text())
    assert [c["kind"] for c in manifest["reuse"]["catalog_compacted"]] == ["orb"]
    own = sorted(p for p in (out / "catalog" / "features").rglob("*.parquet") if "/compact-" not in str(p))
    assert own  # this run's parts, no longer named, kept for its report
    run = load_run(out)
    verified = run.pairs[run.pairs["orb_inliers"].notna()]
    had_features = set(verified["image_id_a"].astype(str)) | set(verified["image_id_b"].astype(str))
    path_of = dict(zip(run.images["image_id"].astype(str), run.images["path"]))
    assert had_features and not [p for p in decoded if any(p.endswith(path_of[i]) for i in had_features)]
    monkeypatch.setattr(catalog, "COMPACT_MAX_PARTS", 64)
    assert main(args) == 0  # the next commit removes them
    assert not [p for p in own if p.exists()]


@pytest.mark.parametrize("catalog", [False, True])
def test_drawings_use_the_verify_tiers_features(review_data, tmp_path, monkeypatch, catalog):
    """A run's drawings match the stored feature rows (no ORB recomputed: pair_evidence is not
    called), and their numbers are the verify tier's for every pair drawn."""
    from pipeline.cli import main
    from pipeline import report
    called = []
    monkeypatch.setattr(verify, "pair_evidence", lambda *a, **k: called.append(a) or None)
    got = {}
    real = report.draw_pair

    def recorded(abs_a, abs_b, cfg, height=report.DRAW_HEIGHT, stored=None, expect=None):
        made = real(abs_a, abs_b, cfg, height, stored=stored, expect=expect)
        name = "-".join(str(image_ids([Path(p).relative_to(review_data).as_posix()])[0]) for p in (abs_a, abs_b)) + ".jpg"
        got[name] = made[1] if made else None
        return made
    monkeypatch.setattr(report, "draw_pair", recorded)
    out = tmp_path / "out"
    assert main(["dedupe", str(review_data), "--out", str(out), "--tiers", "verify", "--scheduler", "sync",
                 "--quiet", *([] if catalog else ["--no-catalog"])]) == 0
    run = load_run(out)
    data = read_data(out / "report")
    drawn = [p for p in data["pairs"] if p[11]]
    assert drawn and not called and len(got) == len(drawn)
    seen = run.pairs[run.pairs["orb_inliers"].notna()]  # duplicates and the closest rejected
    by_name = {f"{r.image_id_a}-{r.image_id_b}.jpg": r for r in seen.itertuples()}
    checked = 0
    for name, ev in got.items():
        if name in by_name:
            r = by_name[name]
            assert (ev["matches"], ev["inliers"]) == (r.orb_matches, r.orb_inliers), name
            checked += 1
    assert checked == len(got) >= 3


def test_stored_evidence_finds_the_mirrored_row_on_either_image(photo_paths, tmp_path):
    """The verify tier pairs images in its own order, so for a mirrored copy the mirrored feature
    row may be the report's image a's: the drawing still shows the mirrored match, with the
    numbers the tier got in its orientation (b plain against a mirrored), a's points on a."""
    from bench import transforms
    from pipeline.decode import dihedral
    cfg = Config()
    data, ext, _ = transforms.render(photo_paths[0], "hflip", seed=0, group="p0")
    (tmp_path / f"flip{ext}").write_bytes(data)
    a = verify._load_bounded(str(photo_paths[0]), cfg)
    b = verify._load_bounded(str(tmp_path / f"flip{ext}"), cfg)
    fa0, fa4 = verify.features(a, cfg.verify), verify.features(dihedral(a, 4), cfg.verify)
    fb0 = verify.features(b, cfg.verify)
    ev = verify.stored_evidence({0: fa0, 4: fa4}, {0: fb0}, cfg)
    matches, inliers, *_ = verify._verify(fb0, fa4, cfg.verify)  # the tier's orientation
    assert inliers >= 50 and ev["mirrored"] and (ev["matches"], ev["inliers"]) == (matches, inliers)
    assert verify.stored_evidence({0: fa0}, {0: fb0}, cfg)["inliers"] < inliers // 2  # plain only: a poor fit
    assert ev["size_a"] == a.size and ev["size_b"] == b.size
    xa, xb = ev["keypoints_a"][ev["inlier"]], ev["keypoints_b"][ev["inlier"]]
    # b is a mirrored: a point (x, y) on a is (width - 1 - x, y) on b, within RANSAC's threshold
    assert np.median(np.abs(xa[:, 0] - (a.width - 1 - xb[:, 0]))) < 2.0
    assert np.median(np.abs(xa[:, 1] - xb[:, 1])) < 2.0
    with pytest.raises(ValueError):
        verify.stored_evidence({4: fa4}, {4: fb0}, cfg)


def test_drawing_tasks_group_pairs_by_the_parts_they_read():
    """Pairs whose feature rows are in the same part go to the same task (each task opens, and for
    a catalog checks, every part it reads), and each task carries the checks of its own parts."""
    from pipeline.report import DRAWINGS_PER_TASK, drawing_tasks
    n = 2 * DRAWINGS_PER_TASK
    todo = [(f"d{i}.jpg", "a.jpg", "b.jpg", ({0: (f"p{i % 2}", 8 * i)}, {0: (f"p{i % 2}", 8 * i + 8)}), (10, 9))
            for i in range(n)]  # the parts alternate, as pairs of clusters in page order do
    tasks = drawing_tasks(todo, {"p0": "1:aa", "p1": "2:bb"})
    assert sorted(item[0] for task, _ in tasks for item in task) == sorted(item[0] for item in todo)
    assert all(len(task) <= DRAWINGS_PER_TASK for task, _ in tasks) and len(tasks) == 2
    opened = [{part for item in task for side in item[3] or () for part, _ in side.values()} for task, _ in tasks]
    assert opened == [{"p0"}, {"p1"}]  # one part a task (cut in the list's order: both, twice)
    for (task, checks), parts in zip(tasks, opened):
        assert checks == {p: {"p0": "1:aa", "p1": "2:bb"}[p] for p in parts}
    # a pair with no stored rows (its features computed again) is drawn all the same
    tasks = drawing_tasks([*todo, ("none.jpg", "a.jpg", "b.jpg", None, (3, 2))], {})
    assert "none.jpg" in [item[0] for task, _ in tasks for item in task] and all(not c for _, c in tasks)


def test_where_the_feature_rows_are_keeps_63_bit_keys():
    """Content keys (catalog) are 63-bit: the mirrored row's key must not pass through float64."""
    from pipeline.run import stored_features
    keys = np.array([4352186540941166408, 4352186540941166412, 5720232531078387320], dtype=np.int64)
    where = stored_features(pd.Series(["p0", "p1", "p2"], index=keys, dtype=object),
                            pd.Series(["s1", "s2"], index=keys[[0, 2]] // 8))
    assert where.loc["s1", "key"] == keys[0] and where.loc["s1", "mirrored_key"] == keys[1]
    assert where.loc["s1", "mirrored_part_path"] == "p1" and pd.isna(where.loc["s2", "mirrored_key"])


def test_a_clusters_workers_make_the_reports_pixels(review_data, tmp_path, monkeypatch):
    """With a Dask cluster, the workers make the report's thumbnails and drawings and the driver
    only writes the bytes they return (it decodes no image for the report), and those are the
    files an in-process run makes."""
    from pipeline import report
    from pipeline.cli import main
    args = [str(review_data), "--tiers", "verify", "--quiet"]
    assert main(["dedupe", *args, "--out", str(tmp_path / "sync"), "--scheduler", "sync"]) == 0
    in_driver = []
    for name in ("make_thumb", "draw_pair", "_stored_rows"):  # what thumbnails and drawings call
        real = getattr(report, name)
        monkeypatch.setattr(report, name, lambda *a, _real=real, _name=name, **k: in_driver.append(_name)
                            or _real(*a, **k))
    assert main(["dedupe", *args, "--out", str(tmp_path / "local"), "--scheduler", "local"]) == 0
    assert not in_driver
    for folder in ("thumbs", "pairs"):
        made = {p.name: p.read_bytes() for p in (tmp_path / "local" / "report" / folder).iterdir()}
        expected = {p.name: p.read_bytes() for p in (tmp_path / "sync" / "report" / folder).iterdir()}
        assert made and made.keys() == expected.keys(), folder
        assert [n for n in made if made[n] != expected[n]] == [], folder
    data = read_data(tmp_path / "local" / "report")
    assert all(row[8] for row in data["images"] if row[7] is None)
    assert [p[11] for p in data["pairs"]] == [p[11] for p in read_data(tmp_path / "sync" / "report")["pairs"]]


def test_the_report_lists_the_largest_clusters_up_to_its_cap(review_run, tmp_path):
    """report.max_clusters / max_errors: the largest clusters are listed, with their duplicate pairs
    and members' thumbnails only; the page says how many there are in all, and the closest
    rejected pairs are the same as uncapped."""
    out = tmp_path / "out"
    out.mkdir()
    for name in ("images.parquet", "pairs.parquet", "run.json"):
        shutil.copy(review_run / name, out / name)
    run = load_run(out)
    full = read_data(review_run / "report")
    total = len(full["clusters"])
    assert total >= 4
    cfg = load_config(None, ["report.max_clusters=2", "report.max_errors=1"])
    write_report(out, run.images, run.pairs, run.manifest, cfg)
    data = read_data(out / "report")
    members = lambda d, c: frozenset(d["images"][i][0] for i in c[1])  # noqa: E731
    assert [members(data, c) for c in data["clusters"]] == [members(full, c) for c in full["clusters"][:2]]
    assert data["meta"]["clusters_total"] == total and data["meta"]["errors_total"] == len(data["errors"]) == 1
    shown = set().union(*[members(data, c) for c in data["clusters"]])
    dup_pairs = [p for p in data["pairs"] if p[9]]
    assert dup_pairs and all({data["images"][p[0]][0], data["images"][p[1]][0]} <= shown for p in dup_pairs)
    assert sum(len(c[3]) for c in data["clusters"]) == len(dup_pairs)
    assert len(data["rejected"]) == len(full["rejected"])
    rejected = lambda d: [(d["images"][d["pairs"][i][0]][0], d["images"][d["pairs"][i][1]][0])  # noqa: E731
                          for i in d["rejected"]]
    assert rejected(data) == rejected(full)
    page = " ".join((out / "report" / "index.html").read_text(encoding="utf-8").split())
    assert f"Clusters (the 2 largest of {total})" in page and "report.max_clusters" in page
    assert "report.max_errors" not in page  # the one file with an error is listed
    # without rejected pairs, the images listed are the listed clusters' members and the error
    # listed, and only they get thumbnails
    cfg = load_config(None, ["report.max_clusters=2", "report.max_errors=1", "report.rejected_pairs=0"])
    write_report(out, run.images, run.pairs, run.manifest, cfg)
    data = read_data(out / "report")
    assert {row[0] for row in data["images"] if row[7] is None} == shown
    assert len(data["images"]) == len(shown) + 1 < len(full["images"])
    assert {p.stem for p in (out / "report" / "thumbs").iterdir()} == shown


def _clustered_pairs(seed: int = 0):
    """Images in three clusters (25 images with every pair a duplicate, 4 likewise, a chain of 5)
    plus singletons, and rejected pairs; closeness values at random. Real 63-bit image ids."""
    rng = np.random.default_rng(seed)
    paths = [f"img{i:04d}.jpg" for i in range(60)]
    ids = image_ids(paths)
    cluster = np.full(60, -1, np.int64)
    groups = [list(range(0, 25)), list(range(25, 29)), list(range(29, 34))]
    rows = []
    for g in groups[:2]:
        rows += [(a, b, True) for i, a in enumerate(g) for b in g[i + 1:]]
    rows += [(a, a + 1, True) for a in groups[2][:-1]]
    for g in groups:
        cluster[g] = ids[g[0]]
    rows += [(a, b, False) for a, b in zip(range(34, 59), range(35, 60))]
    a, b, dup = (np.array(x) for x in zip(*rows))
    n = len(rows)
    reached = rng.random(n)
    pairs = pd.DataFrame({
        "is_duplicate": dup, "image_id_a": ids[a], "image_id_b": ids[b],
        "cosine": pd.array(np.where(reached < 0.5, rng.random(n), np.nan), dtype="Float32"),
        "orb_inliers": pd.array(np.where(reached < 0.8, rng.integers(0, 300, n), -1), dtype="Int32"),
        "hash_distance": rng.integers(0, 11, n).astype(np.int16)})
    pairs.loc[pairs["orb_inliers"] < 0, "orb_inliers"] = pd.NA
    images = pd.DataFrame({"path": paths, "image_id": ids,
                           "cluster_id": pd.array(np.where(cluster >= 0, cluster, 0), dtype="Int64")})
    images.loc[cluster < 0, "cluster_id"] = pd.NA
    return images, pairs, groups


def _spanning_tree_by_kruskal(pairs: pd.DataFrame) -> set[int]:
    """The reference: Kruskal's algorithm over the pairs in closeness order (closest first)."""
    parent: dict = {}

    def find(x):
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x
    tree = set()
    for i in closeness_order(pairs):
        ra, rb = find(pairs["image_id_a"].iat[i]), find(pairs["image_id_b"].iat[i])
        if ra != rb:
            parent[ra] = rb
            tree.add(int(i))
    return tree


@pytest.mark.parametrize("per_cluster", [0, 40, 1000])
def test_a_cluster_lists_the_closest_link_of_each_member_then_its_closest_pairs(per_cluster):
    """report.pairs_per_cluster: each listed cluster shows a spanning tree of its duplicate pairs
    in closeness order (every member with the evidence that links it), then its closest other
    pairs up to the cap; the closest rejected pairs are unchanged; the selection is the same when
    made again on the selected pairs (a run hands write_report only those)."""
    from pipeline.config import ReportConfig
    from pipeline.report import shown_pairs
    images, pairs, groups = _clustered_pairs()
    rcfg = ReportConfig(pairs_per_cluster=per_cluster, rejected_pairs=10)
    shown, rejected = shown_pairs(images, pairs, rcfg)
    assert list(shown) == sorted(set(shown)) and set(rejected) <= set(shown)
    dup = pairs["is_duplicate"].to_numpy()
    assert len(rejected) == 10 and not dup[rejected].any()
    ids = images["image_id"].to_numpy()
    for g in groups:
        members = set(ids[g])
        mine = np.flatnonzero(dup & pairs["image_id_a"].isin(members).to_numpy())
        listed = [i for i in shown if i in set(mine)]
        tree = {int(mine[i]) for i in _spanning_tree_by_kruskal(pairs.iloc[mine].reset_index(drop=True))}
        assert len(tree) == len(g) - 1 and tree <= set(listed)
        assert {x for i in tree for x in pairs.loc[i, ["image_id_a", "image_id_b"]]} == members
        expected = min(len(mine), max(per_cluster, len(g) - 1))
        assert len(listed) == expected
        others = [int(mine[i]) for i in closeness_order(pairs.iloc[mine]) if int(mine[i]) not in tree]
        assert set(listed) - tree == set(others[:expected - len(tree)])  # the closest of the rest
    again, again_rejected = shown_pairs(images, pairs.iloc[shown].reset_index(drop=True), rcfg)
    assert list(again) == list(range(len(shown)))
    assert list(shown[again_rejected]) == list(rejected)


def test_the_report_data_counts_every_duplicate_pair_of_a_cluster_it_lists_fewer_of(tmp_path):
    """A cluster row holds its listed pairs and the count of all its duplicate pairs, from the
    pairs themselves or, in a run (which hands over the listed pairs only), as given."""
    from pipeline.report import build_data, duplicate_pairs_per_cluster, shown_pairs
    images, pairs, groups = _clustered_pairs()
    n = len(images)
    images = images.assign(bytes=np.arange(n) + 1000, width=pd.array([100] * n, dtype="Int64"),
                           height=pd.array([80] * n, dtype="Int64"), format="JPEG", mtime=1.7e9,
                           error=None, abs_path=[str(tmp_path / p) for p in images["path"]])
    pairs = pairs.assign(orb_matches=pairs["orb_inliers"], orb_score=pd.array([0.5] * len(pairs), dtype="Float32"),
                         stage="verify", rule="orb_match", reason="test")
    cfg = load_config(None, ["report.pairs_per_cluster=30"])
    full = build_data(images, pairs, {"counts": {}}, cfg.report)
    totals = [25 * 24 // 2, 4 * 3 // 2, 4]  # two clusters with every pair a duplicate, a chain of 5
    assert sorted((len(c[1]), len(c[3]), c[4]) for c in full["clusters"]) == sorted(
        (len(g), min(total, max(30, len(g) - 1)), total) for g, total in zip(groups, totals))
    counts = duplicate_pairs_per_cluster(images, pairs["is_duplicate"], pairs["image_id_a"])
    shown, _ = shown_pairs(images, pairs, cfg.report)
    part = build_data(images, pairs.iloc[shown].reset_index(drop=True), {"counts": {}}, cfg.report,
                      rejected_total=int((~pairs["is_duplicate"]).sum()), cluster_pairs=counts)
    assert part["clusters"] == full["clusters"] and part["pairs"] == full["pairs"]
    assert part["meta"] == full["meta"]


def test_a_repeated_pair_row_counts_once_in_the_clusters_links():
    """Outputs joined by hand can repeat a pair: its closest row is the edge, and every member
    still gets a listed link."""
    from pipeline.report import cluster_links
    pairs = pd.DataFrame({"image_id_a": [1, 1, 2], "image_id_b": [2, 2, 3],
                          "cosine": pd.array([0.9, 0.95, 0.8], dtype="Float32"),
                          "orb_inliers": pd.array([None] * 3, dtype="Int32"), "hash_distance": [1, 1, 2]})
    keep = cluster_links(pairs, np.array([7, 7, 7]), 0)
    assert keep.tolist() == [False, True, True]  # (1, 2) by its closer row, then (2, 3)


@pytest.mark.parametrize("rows", [1, 7, 300])
def test_cluster_links_made_a_few_clusters_at_a_time_select_the_same_pairs(rows, monkeypatch):
    """report.LINK_ROWS: the selection made over whole clusters of about that many pairs at a time
    (a cluster bigger than that alone) is the selection made over all pairs at once."""
    from pipeline import report
    images, pairs, _ = _clustered_pairs()
    dup = pairs[pairs["is_duplicate"].to_numpy()].reset_index(drop=True)
    cluster = report._cluster_of(images, dup["image_id_a"])
    rng = np.random.default_rng(rows)
    shuffled = rng.permutation(len(dup))  # clusters interleaved, not in runs
    dup, cluster = dup.iloc[shuffled].reset_index(drop=True), cluster[shuffled]
    for per_cluster in (0, 30):
        whole = report.cluster_links(dup, cluster, per_cluster)
        monkeypatch.setattr(report, "LINK_ROWS", rows)
        assert report.cluster_links(dup, cluster, per_cluster).tolist() == whole.tolist()
        monkeypatch.setattr(report, "LINK_ROWS", 10**9)
    assert len(np.unique(cluster)) == 3 and whole.sum() < len(dup)  # (several clusters; a real selection)


def test_a_rebuilt_report_has_thumbnails_of_names_that_are_not_utf8(photo_paths, tmp_path):
    """`dedupe report` reads the outputs' text forms, which name no file where a name, or the
    scanned folder's own path, is not UTF-8: it finds the files by their bytes (raw_path,
    `paths.os_name`), so every listed image has its thumbnail (a rebuild had none of them)."""
    import os
    data = Path(os.fsdecode(os.fsencode(str(tmp_path)) + b"/d\xe9/data"))
    data.mkdir(parents=True)
    with Image.open(photo_paths[0]) as im:
        rgb = im.convert("RGB")
    rgb.save(data / "a.jpg", quality=90)
    rgb.resize((rgb.width // 2, rgb.height // 2)).save(os.fsdecode(os.fsencode(str(data)) + b"/caf\xe9.jpg"),
                                                       quality=85)
    out = tmp_path / "out"
    assert main_report_run(data, out) == 0
    rebuilt = tmp_path / "rebuilt"  # (the outputs alone: no earlier report to take thumbnails from)
    rebuilt.mkdir()
    for name in ("images.parquet", "pairs.parquet", "run.json"):
        shutil.copy(out / name, rebuilt / name)
    assert main_report(rebuilt) == 0
    listed = read_data(rebuilt / "report")["images"]
    assert len(listed) == 2 and all(row[8] for row in listed)  # [8]: has a thumbnail
    assert len(list((rebuilt / "report" / "thumbs").iterdir())) == 2


def main_report_run(data, out):
    from pipeline.cli import main
    return main(["dedupe", str(data), "--out", str(out), "--tiers", "screen", "--scheduler", "sync", "--quiet"])


def test_slivers_get_the_pixel_check_and_banners_a_drawing(tmp_path):
    """A one-pixel sliver: ORB raised on it, so its feature row was an error with no pixel-check
    data, and its pairs went to the confirm tier's cosine alone (a 2 x 2 tile was called a copy of
    a 20000 x 1 ramp). Now it has no keypoints and the pixel check decides. A banner pair (12000 x
    70) with keypoints: its drawing was a 55k-pixel-wide canvas, past what JPEG holds, and the
    run failed writing the report; now each side is at most DRAW_MAX_RATIO x its height wide."""
    from pipeline.cli import main
    from pipeline import report
    data, out = tmp_path / "data", tmp_path / "out"
    data.mkdir()
    ramp = np.linspace(0, 255, 20000).astype(np.uint8)
    Image.fromarray(np.stack([ramp] * 3, -1)[None]).save(data / "grey_ramp.png")
    red = np.zeros((1, 20000, 3), np.uint8)
    red[0, :, 0], red[0, :, 2] = ramp, 40
    Image.fromarray(red).save(data / "red_ramp.png")
    Image.fromarray(np.array([[[30, 60, 90], [220, 200, 180]], [[20, 40, 200], [250, 240, 10]]], np.uint8)) \
        .save(data / "four_pixels.png")
    rng = np.random.default_rng(3)
    banner = Image.fromarray(rng.integers(0, 255, (35, 6000, 3), dtype=np.uint8)).resize((12000, 70))
    banner.save(data / "banner.png")
    banner.save(data / "banner_copy.jpg", quality=90)
    assert main(["dedupe", str(data), "--out", str(out), "--tiers", "verify", "--scheduler", "sync",
                 "--no-catalog", "--quiet"]) == 0
    pairs = pd.read_parquet(out / "pairs.parquet")
    thin = pairs[pairs["path_a"].str.contains("ramp|four") & pairs["path_b"].str.contains("ramp|four")]
    assert len(thin) >= 2 and thin["ssim"].notna().all() and not thin["is_duplicate"].any(), thin
    assert set(thin["rule"].astype(str)) <= {"verify_pixel_mismatch", "verify_pixel_match"}
    banners = pairs[(pairs["path_a"] == "banner.png") & (pairs["path_b"] == "banner_copy.jpg")]
    assert banners["is_duplicate"].all() and len(banners) == 1
    # (the report draws a pair ORB matched anything in; the banner's drawing, made here, is bounded)
    from pipeline.config import Config
    drawn = report.draw_pair(str(data / "banner.png"), str(data / "banner_copy.jpg"), Config())
    assert drawn is not None
    with Image.open(io.BytesIO(drawn[0])) as canvas:
        assert canvas.width <= 2 * report.DRAW_MAX_RATIO * report.DRAW_HEIGHT + 12


def test_pairs_orb_matched_nothing_in_are_not_drawn():
    """A pair with 0 ORB matches (a pixel-checked flat pair) got a drawing of no line under "green
    = inliers, red = outliers", and took one of the draw_rejected slots a real ORB rejection could
    have had; a pair ORB never saw (exact, screen-only) is not drawn either."""
    from pipeline.config import ReportConfig
    from pipeline.report import _draw_list
    # rows as data.js has them: a, b, hash_distance, orb_matches, orb_inliers, ...
    pairs = [[0, 1, 0, None, None], [0, 2, 3, 40, 30], [3, 4, 5, 0, 0], [5, 6, 6, 12, 2], [7, 8, 2, 0, 0]]
    data = {"pairs": pairs, "clusters": [["0", [0, 1, 2], 0, [0, 1], 2]], "rejected": [4, 2, 3]}
    assert _draw_list(data, ReportConfig(draw_pairs=5, draw_rejected=2)) == [1, 3]


def test_the_legend_gives_the_thresholds_that_decided_this_run(review_data, review_run, tmp_path):
    """A screen-only run's pairs are decided by decide.screen_only_distance, a verify run's by
    verify.match_inliers: the legend named the confirm tier's thresholds for every run (ORB
    inliers and cosine where neither was looked at), and never the pixel check's."""
    import html
    from pipeline.cli import main

    def legend(out: Path) -> str:
        page = html.unescape(re.sub(r"\s+", " ", (out / "report" / "index.html").read_text(encoding="utf-8")))
        return page[page.index("Thresholds of this run"):].split("</li>")[0]

    full = legend(review_run)
    assert "accept at ≥ 25 ORB inliers" in full and "cosine ≥ 0.78" in full and "SSIM ≥ 0.8" in full, full
    for tiers, wanted, unwanted in (("screen", "duplicate at hash distance ≤ 3", ("ORB", "cosine", "SSIM")),
                                    ("verify", "duplicate at ≥ 15 ORB inliers", ("cosine",))):
        out = tmp_path / tiers
        assert main(["dedupe", str(review_data), "--out", str(out), "--tiers", tiers, "--scheduler", "sync", "--quiet",
                     "--no-catalog", "--set", "decide.screen_only_distance=3"]) == 0
        text = legend(out)
        assert wanted in text and not any(w in text for w in unwanted), text


def test_a_report_rebuild_does_not_write_into_a_run_published_meanwhile(photo_paths, tmp_path, monkeypatch, capsys):
    """`dedupe report OUT` read the run, then took OUT's lock and wrote into the generation OUT
    names: a run that published in between got the report of the run read (its run.json said one
    run, its report another). Now the rebuild names the change and stops, exit 2."""
    import json as json_
    from pipeline import results
    from pipeline.cli import main
    first, second, out = tmp_path / "first", tmp_path / "second", tmp_path / "out"
    for folder, photos in ((first, photo_paths[:3]), (second, photo_paths[3:5])):
        folder.mkdir()
        for p in photos:
            (folder / p.name).write_bytes(p.read_bytes())
    common = ["--tiers", "screen", "--scheduler", "sync", "--no-catalog", "--quiet"]
    assert main(["dedupe", str(first), "--out", str(out), *common]) == 0
    read = results.load_run

    def read_then_another_run_publishes(where, *a, **k):
        run = read(where, *a, **k)
        assert main(["dedupe", str(second), "--out", str(out), *common]) == 0
        return run

    monkeypatch.setattr(results, "load_run", read_then_another_run_publishes)
    capsys.readouterr()
    assert main(["report", str(out)]) == 2
    assert "now holds another run" in capsys.readouterr().err
    now = json_.loads((out / "run.json").read_text())
    data = (out / "report" / "data.js").read_text()
    assert now["root"].endswith("second") and str(second) in data and str(first) not in data
