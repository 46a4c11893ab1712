"""The speed benchmarks' own logic: the fastdup comparison skips cleanly without its virtualenv,
and the profile attributes each sample to the innermost known activity."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from bench import fastdup, profile


@pytest.mark.parametrize("bench", ["fastdup", "floor"])
def test_fastdup_benchmarks_skip_without_its_virtualenv(tmp_path, monkeypatch, capsys, bench):
    import importlib
    module = importlib.import_module(f"bench.{bench}")
    monkeypatch.setattr(fastdup, "FASTDUP_VENV", tmp_path / "missing")
    out = tmp_path / "benchmarks.md"
    assert module.main(["--sizes", "small", "--rounds", "1", "--out", str(out)]) == 0
    assert "make fastdup" in capsys.readouterr().err
    assert not out.exists()


def _node(filename, name, count, *children):
    return {"description": {"filename": filename, "name": name}, "count": count,
            "children": {f"{c['description']['name']}-{i}": c for i, c in enumerate(children)}}


def test_profile_samples_go_to_the_innermost_activity():
    tree = _node("", "root", 100,
                 _node("/x/pipeline/verify.py", "features_partition", 60,
                       _node("/x/pipeline/decode.py", "load_image", 20, _node("/x/PIL/Image.py", "resize", 5)),
                       _node("/x/pipeline/verify.py", "_keypoint_features", 30),
                       _node("/x/pipeline/store.py", "write_partition", 4)),
                 _node("/x/pipeline/verify.py", "verify_partition", 40,
                       _node("/x/pipeline/hamming.py", "match_descriptors", 25), _node("/x/pipeline/verify.py", "_ransac", 10)))
    got = profile.categorise(tree)
    assert got["decode"] == 15 and got["resize"] == 5 and got["ORB features"] == 30
    assert got["Parquet / serialisation"] == 4 and got["matching"] == 25 and got["RANSAC"] == 10
    assert sum(got.values()) == 100  # 6 + 5 own samples of the two task frames go to "other"


def test_profile_rates_table_sets_run_against_bench_per_wall_and_cpu_second():
    by_prefix = {"features_task": {"compute": 100.0}, "verify_partition": {"compute": 20.0}}
    counts = {"verify_features": 5000, "verified_pairs": 40000}
    rates = {"features": 100.0, "pairs": 4000.0, "features_cpu": 125.0, "pairs_cpu": 4000.0, "photos": 40}
    text = profile.verify_rates_table(by_prefix, counts, rates, {"_features_task": 50.0, "verify_partition": 12.5})
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in text.splitlines() if line.startswith("| ") and "per core" in line}
    assert rows["features/s per core"] == ["50", "100", "0.50", "100", "125", "0.80"]
    assert rows["pairs/s per core"] == ["2,000", "4,000", "0.50", "3,200", "4,000", "0.80"]


def test_worker_alloc_benchmark_writes_its_section(tmp_path, photo_paths):
    from bench import worker_alloc
    out = tmp_path / "benchmarks.md"
    folder = tmp_path / "img"
    folder.mkdir()
    for p in photo_paths[:3]:
        (folder / p.name).write_bytes(p.read_bytes())
    assert worker_alloc.main(["--folder", str(folder), "--images", "3", "--rounds", "1", "--out", str(out)]) == 0
    text = out.read_text()
    assert "<!-- section:worker-alloc -->" in text and "worker, as the pipeline starts it" in text


def test_driver_memory_subset_takes_whole_groups_as_hard_links(tmp_path):
    from bench import driver_memory
    images = tmp_path / "images"
    images.mkdir()
    for name in ("g0000_original.jpg", "g0000_crop.jpg", "g0001_original.jpg", "g0001_flip.jpg", "g0002_original.jpg"):
        (images / name).write_bytes(name.encode())
    folder = driver_memory.subset(images, 3, tmp_path / "subsets")
    assert sorted(p.name for p in folder.iterdir()) == ["g0000_crop.jpg", "g0000_original.jpg",
                                                        "g0001_flip.jpg", "g0001_original.jpg"]
    assert (folder / "g0001_flip.jpg").stat().st_ino == (images / "g0001_flip.jpg").stat().st_ino
    assert driver_memory.subset(images, 0, tmp_path / "subsets") == images  # 0: the whole folder


def test_floor_work_is_the_tiers_own_per_file_work(photo_paths):
    """Each floor does real work on real photos: ORB finds keypoints (the verify tier's own
    features up to its cap), the screen succeeds, the model embeds every file of a batch."""
    import dataclasses

    from bench import floor
    from pipeline import confirm
    from pipeline.config import Config
    cfg = Config()
    cfg.embed = dataclasses.replace(cfg.embed, threads=1)
    cfg = confirm.prepare_runtime(cfg)
    floor._init(cfg)
    paths = [str(p) for p in photo_paths[:3]]
    for path in paths:
        assert floor._floor(("decode", path)) is True
        assert floor._floor(("screen", path)) == 1
        assert 0 < floor._floor(("decode + verify features", path)) <= cfg.verify.n_features
        assert 0 < floor._floor(("decode + ORB (OpenCV defaults)", path)) <= cfg.verify.n_features
        assert floor._floor(("one decode, screen + verify", path)) == floor._floor(("decode + verify features", path))
    assert floor._embed(paths) == 3
    assert floor._floor(("screen", "/nonexistent/x.jpg")) == 0  # a file that cannot be read: counted, no raise


def test_out_dash_prints_the_section_and_writes_no_file(tmp_path, monkeypatch, capsys):
    from bench.report import update_section
    monkeypatch.chdir(tmp_path)
    update_section("x", "A title", "body text", "-")
    printed = capsys.readouterr().out
    assert "## A title" in printed and "body text" in printed
    assert list(tmp_path.iterdir()) == []  # no file named "-" (nor any other)


def test_driver_memory_fresh_model_cache_links_the_weights_and_no_conversion(tmp_path, monkeypatch):
    from bench import driver_memory
    from pipeline import weights
    home = tmp_path / "home"
    (home / "models" / "dedupe-tflite").mkdir(parents=True)
    (home / "models" / "w.h5").write_bytes(b"weights")
    (home / "models" / "dedupe-tflite" / "m.tflite").write_bytes(b"converted")
    monkeypatch.setenv("KERAS_HOME", str(home))
    fresh = driver_memory.fresh_model_cache(tmp_path / "fresh")
    assert sorted(p.name for p in (fresh / "models").iterdir()) == ["w.h5"]
    assert (fresh / "models" / "w.h5").read_bytes() == b"weights" and (fresh / "models" / "w.h5").is_symlink()
    assert weights.cache_dirs(fresh)[0] == fresh / "models"


def test_driver_memory_rerun_measures_a_second_run_that_reuses_everything(tmp_path, models_dir):
    """`--rerun` samples the second run into one OUT: its catalog, made by the first, serves every
    file (nothing is screened again), and the driver's RSS was sampled."""
    import numpy as np
    from PIL import Image

    from bench import driver_memory
    rng = np.random.default_rng(5)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(tmp_path / f"g{i:04d}_original.png")
    result = driver_memory.run_driver(tmp_path, rerun=True)
    assert result["reuse"]["screen"] == {"files": 4, "reused": 4, "screened": 0, "why_screened": {}}
    assert result["counts"]["files"] == 4 and result["peak"] > 50e6 and "start" in result["stages"]


def test_driver_memory_rerun_from_an_earlier_out_links_it_and_leaves_it_as_it_was(tmp_path, models_dir, monkeypatch):
    """`--rerun --catalog-from OUT`: the measured run starts from hard links of an earlier run's OUT
    (no first run of its own), its catalog serves every file, and that OUT is left as it was."""
    import json

    import numpy as np
    from PIL import Image

    from bench import driver_memory
    from pipeline.cli import main
    rng = np.random.default_rng(6)
    data = tmp_path / "data"
    data.mkdir()
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(data / f"g{i:04d}_original.png")
    earlier = tmp_path / "earlier"
    assert main(["dedupe", str(data), "--out", str(earlier), "--scheduler", "sync", "--quiet"]) == 0
    before = {p.relative_to(earlier): p.stat().st_mtime_ns for p in earlier.rglob("*")}
    result = driver_memory.run_driver(data, rerun=True, catalog_from=earlier)
    assert result["reuse"]["screen"] == {"files": 3, "reused": 3, "screened": 0, "why_screened": {}}
    assert {p.relative_to(earlier): p.stat().st_mtime_ns for p in earlier.rglob("*")} == before
    assert json.loads((earlier / "run.json").read_text())["counts"]["files"] == 3
    # --new-out: only the catalog, in a new OUT (a run beside a shared catalog, no earlier report)
    linked = []
    real_copytree = shutil.copytree
    monkeypatch.setattr(shutil, "copytree",
                        lambda src, dst, *a, **kw: linked.append((src, dst)) or real_copytree(src, dst, *a, **kw))
    fresh = driver_memory.run_driver(data, rerun=True, catalog_from=earlier, new_out=True)
    assert fresh["reuse"]["screen"] == {"files": 3, "reused": 3, "screened": 0, "why_screened": {}}
    assert (Path(linked[0][0]), Path(linked[0][1]).name) == (earlier / "catalog", "catalog")  # (then its folders)
    assert {p.relative_to(earlier): p.stat().st_mtime_ns for p in earlier.rglob("*")} == before
    other = tmp_path / "other"  # an OUT of another folder: its run would read every file, so it is refused
    other.mkdir()
    Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(other / "g0009_original.png")
    with pytest.raises(SystemExit, match="not a re-run over an unchanged folder"):
        driver_memory.run_driver(other, rerun=True, catalog_from=earlier)


def test_driver_memory_external_samples_the_driver_and_its_own_scheduler_apart(tmp_path, models_dir):
    """`--external`: the run goes through a real `dask scheduler` + 2 workers on 127.0.0.1 (the
    scheduler out of the driver), with the same outputs as on a local cluster, and both processes'
    RSS sampled."""
    import numpy as np
    from PIL import Image

    from bench import driver_memory
    rng = np.random.default_rng(6)
    for i in range(3):
        pixels = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / f"g{i:04d}_original.png")
        Image.fromarray(pixels).resize((96, 72)).save(tmp_path / f"g{i:04d}_bigger.png")
    external = driver_memory.run_driver(tmp_path, external=True)
    local = driver_memory.run_driver(tmp_path)
    assert external["counts"] == local["counts"] and external["counts"]["files"] == 6
    assert external["counts"]["near_candidates"] >= 3
    assert external["scheduler_peak"] > 50e6 and external["peak"] > 50e6 and local["scheduler_peak"] is None


def test_cost_model_predicts_the_driver_points_back_and_projects_its_memory(tmp_path):
    """docs/cost-model.md's driver section: a line through the two fitted points (so they come
    back at 0 %), every measured point predicted back with its error, and projections that grow
    with the folder by the fitted bytes per image."""
    import re

    from bench import cost_model
    out = tmp_path / "cost.md"
    cost_model.main(["--out", str(out)])
    text = out.read_text(encoding="utf-8")
    section = text.split("## Driver memory", 1)[1].split("\n## ", 1)[0]
    fixed, per_image = (float(x.replace(",", "")) for x in
                        re.search(r"Model: \*\*([\d,.]+) MB \+ ([\d,.]+) kB x images\*\*", section).groups())
    for point in cost_model.DRIVER:
        row = next(line for line in section.splitlines() if line.startswith(f"| {point['images']:,} images"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert int(cells[2].replace(",", "")) == point["peak_mb"]
        assert float(cells[3].replace(",", "")) == pytest.approx(fixed + per_image * point["images"] / 1e3, rel=0.01)  # (the model line is rounded)
        if point["fit"]:
            assert cells[4] in ("+0 %", "-0 %")
    projected = {int(m.group(1).replace(",", "")): float(m.group(2).replace(",", ""))
                 for m in re.finditer(r"^\| ([\d,]+) \| ([\d,.]+) GB \|$", section, re.M)}
    assert sorted(projected) == [1_000_000, 10_000_000, 1_000_000_000]
    assert projected[10_000_000] == pytest.approx((fixed + per_image * 1e4) / 1e3, rel=0.01)


@pytest.mark.parametrize("argv, named", [
    (["--scale-rounds", "4", "--fresh-model-cache"], "--scale-rounds"),
    (["--scale-rounds", "4", "--rerun"], "--catalog-from"),  # (not a 100k first run per tree)
    (["--catalog-from", "{tmp}"], "--catalog-from"),  # (only with --rerun)
    (["--rerun", "--catalog-from", "{tmp}"], "not the OUT of a finished run"),
    (["--rerun", "--catalog-from", "{tmp}", "--sizes", "5000,0"], "one size"),  # (one folder's catalog)
])
def test_driver_memory_refuses_runs_it_cannot_measure_before_any_work(monkeypatch, capsys, tmp_path, argv, named):
    from bench import driver_memory

    def no_data(*args, **kwargs):
        raise AssertionError("the arguments were checked after the data was made")
    monkeypatch.setattr(driver_memory, "generate", no_data)
    if named == "one size":  # (an OUT of a finished run, but one folder's)
        (tmp_path / "run.json").write_text("{}")
    monkeypatch.setattr("sys.argv", ["driver_memory", *[a.format(tmp=tmp_path) for a in argv]])
    with pytest.raises(SystemExit) as exc:
        driver_memory.main()
    assert exc.value.code == 2 and named in capsys.readouterr().err


@pytest.mark.parametrize("cpw", [2, 3, 4])
def test_chunk_order_counts_what_a_pairwise_check_counts(cpw):
    """bench.chunk_order's verifications per query row (bucket tables, or sorted values past 24
    bits) equal a direct count: the distinct codes within each chunk's radius of the row's chunk
    value, summed over the chunks, the row's own image's codes left out."""
    import numpy as np

    from bench.chunk_order import code_set, verifications
    from pipeline import search
    rng = np.random.default_rng(cpw)
    base = rng.integers(0, 2**63, size=40, dtype=np.uint64)
    # 120 images in 40 groups of near copies (a few bits flipped), 2 variants each, one indexed
    codes = np.repeat(base, 3)[:, None, None] ^ (np.uint64(1) << rng.integers(0, 64, size=(120, 2, 1)).astype(np.uint64))
    use = np.ones((120, 2), bool)
    idx_use = np.zeros((120, 2), bool)
    idx_use[:, 0] = True
    entries, queries, own = code_set(codes, use, idx_use, np.ones(120, bool), sample=50, seed=0)
    assert len(queries) == len(own) == 50
    for T in (4, 10):
        lengths = search.chunk_geometry(cpw, 1)[0]
        radii = search._radii(lengths, T)
        want = 0
        for ci, r in enumerate(radii):
            if r < 0:
                continue
            ev = search.chunk_values(entries, cpw, ci)
            for q, mine in zip(search.chunk_values(queries, cpw, ci), own):
                near = {int(e) for e, v in zip(entries[:, 0], ev) if bin(int(v ^ q)).count("1") <= r}
                want += len(near - {int(m) for m in mine[:, 0]})
        assert verifications(entries, queries, own, cpw, T) == pytest.approx(want / 50)


def test_interleaved_runs_takes_turns_and_refuses_differing_results():
    import pandas as pd

    from bench.report import interleaved_runs
    calls = []
    ways = {name: (lambda name=name: calls.append(name) or pd.DataFrame({"a": [1, 2]})) for name in ("x", "y")}
    times, extra, first = interleaved_runs(ways, 2, warm_up=True, after=lambda: len(calls))
    assert calls == ["x", "y"] * 3  # in turns, the warm-up round first
    assert [len(times["x"]), len(times["y"])] == [2, 2] and extra == {"x": [3, 5], "y": [4, 6]}
    assert first.equals(pd.DataFrame({"a": [1, 2]}))
    ways["z"] = lambda: pd.DataFrame({"a": [1, 3]})
    with pytest.raises(SystemExit, match="z: the lists differ from x's"):
        interleaved_runs(ways, 1)


def test_counting_s3_server_logs_each_response_s_bytes_and_delay(tmp_path):
    """bench/moto_counting.py (the storage bench's server): each request's line carries the bytes
    it returned, so a ranged GET counts what it returned; `--latency-ms` delays every response."""
    import time

    from bench import storage_catalog
    if not (storage_catalog.BIN / "moto_server").exists():
        pytest.skip("moto[server] is not installed (make install installs the test extras)")
    import s3fs
    log = tmp_path / "moto.log"
    proc, endpoint = storage_catalog.start_moto(log, latency_ms=150)
    try:
        fs = s3fs.S3FileSystem(key="k", secret="s", endpoint_url=endpoint, skip_instance_cache=True)
        fs.mkdir(storage_catalog.BUCKET)
        fs.pipe_file(f"{storage_catalog.BUCKET}/out/catalog/a.bin", bytes(range(256)) * 40)
        since = storage_catalog.log_lines(log)
        t = time.perf_counter()
        assert fs.cat_file(f"{storage_catalog.BUCKET}/out/catalog/a.bin", start=100, end=400) == \
            (bytes(range(256)) * 40)[100:400]
        assert time.perf_counter() - t >= 0.15
        assert fs.cat_file(f"{storage_catalog.BUCKET}/out/catalog/a.bin") == bytes(range(256)) * 40
        time.sleep(0.2)  # (the line is written once the body is sent)
        assert storage_catalog.get_bytes(log, since, "out") == (2, 300 + 10_240)
        assert storage_catalog.get_bytes(log, since, "data") == (0, 0)
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.mark.slow
def test_pair_best_benchmark_runs_both_trees_and_writes_its_section(tmp_path):
    """Tiny sizes, this tree as its own baseline: both trees run in their own processes and
    clusters, their results are compared, and the section names each tree's time and peaks."""
    from bench import pair_best
    codes, use, idx_use, a, b = pair_best.data(5000, 3, None)
    assert (a < b).all() and np.unique(a * 5000 + b).size == a.size and (np.diff(a) >= 0).all()
    out = tmp_path / "bench.md"
    assert pair_best.main(["--images", "20000", "--rounds", "1", "--repeats", "1", "--baseline",
                           str(pair_best.REPO), "--out", str(out)]) == 0
    text = out.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| near rows") or line.startswith("| any rows")]
    assert len(rows) == 4 and all(float(r.split("|")[6]) > 50 for r in rows)  # worker peaks in MiB


def test_listing_benchmark_lists_the_same_files_both_ways_and_writes_its_section(tmp_path):
    """A small folder (images, a mislabelled file, a non-image, a sub-folder): the two listings
    must agree (the benchmark stops otherwise) and the section gives both rows."""
    from PIL import Image

    from bench import listing
    folder = tmp_path / "images"
    for i in range(6):
        (folder / f"d{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (i, 2 * i, 3 * i)).save(folder / f"d{i % 2}" / f"{i}.jpg")
    (folder / "fake.jpg").write_bytes(b"not an image")
    (folder / "notes.txt").write_text("no")
    out = tmp_path / "bench.md"
    assert listing.main(["--folder", str(folder), "--rounds", "1", "--out", str(out)]) == 0
    rows = [line for line in out.read_text().splitlines() if line.startswith("| every") or line.startswith("| catalog")]
    assert len(rows) == 2 and all(r.split("|")[2].strip() == "7" for r in rows)  # (6 images + the mislabelled one)


def test_edit_types_set_is_the_same_bytes_for_the_same_seed(tmp_path, photos_dir):
    """bench/edit_types.py: two sources, generated twice -> the same files byte for byte and the
    same labels (one original + one copy per edit type each; a collage shows 3 more photos)."""
    from bench import edit_types
    for name in ("a", "b"):
        edit_types.generate(tmp_path / name, photos_dir, seed=3, sources=2)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    import pandas as pd
    labels = pd.read_csv(tmp_path / "a" / "labels.csv")
    assert len(labels) == 2 * (1 + len(edit_types.EDITS)) == len(files) - 1
    assert sorted(labels["edit"].unique()) == sorted(["original", *edit_types.EDITS])
    shows = labels.set_index("path")["shows"].str.split(";")
    assert all(len(shows[p]) == (4 if p.startswith("collage/") else 1) for p in labels["path"])
    assert set(shows["collage/g0000.jpg"][1:]).isdisjoint(labels["source"])  # (tiles are not sources)


def test_edit_types_scores_direct_pairs_clusters_and_false_pairs():
    """Recall, where a miss was lost and the false pairs, on a hand-made run: two photos (x, y),
    each with a rot5 copy and a collage; y's collage has x's photo among its tiles."""
    import pandas as pd

    from bench import edit_types
    labels = pd.DataFrame([
        ("original/g0.jpg", "g0", "original", "x.jpg"), ("rot5/g0.jpg", "g0", "rot5", "x.jpg"),
        ("collage/g0.jpg", "g0", "collage", "x.jpg;t1.jpg;t2.jpg;t3.jpg"),
        ("original/g1.jpg", "g1", "original", "y.jpg"), ("rot5/g1.jpg", "g1", "rot5", "y.jpg"),
        ("collage/g1.jpg", "g1", "collage", "y.jpg;x.jpg;t3.jpg;t4.jpg"),
    ], columns=["path", "group_id", "edit", "shows"])
    pairs = pd.DataFrame([
        ("original/g0.jpg", "rot5/g0.jpg", True, "verify_orb_accept"),       # found
        ("original/g1.jpg", "rot5/g1.jpg", False, "confirm_cosine_low"),     # lost at confirm
        ("collage/g0.jpg", "original/g0.jpg", False, "verify_orb_reject"),   # lost at verify
        ("collage/g1.jpg", "original/g0.jpg", True, "confirm_cosine_orb"),   # a tile of it: true
        ("collage/g0.jpg", "collage/g1.jpg", True, "verify_orb_accept"),     # share a tile: true
        ("original/g0.jpg", "rot5/g1.jpg", True, "verify_orb_accept"),       # false
        ("collage/g0.jpg", "rot5/g1.jpg", False, "verify_orb_reject"),
    ], columns=["path_a", "path_b", "is_duplicate", "rule"])
    # (original/g1 and collage/g1 never a candidate: lost at the screen, within distance 3 by hash)
    clusters = {"original/g0.jpg": 1, "rot5/g0.jpg": 1, "collage/g1.jpg": 1, "collage/g0.jpg": 1, "rot5/g1.jpg": 1,
                "original/g1.jpg": 2}
    hashes = {"original/g1.jpg": 0b1111, "collage/g1.jpg": 0b0001}
    r = edit_types.score(pairs, labels, clusters, hashes, max_distance=3)
    rot, col = r["edits"]["rot5"], r["edits"]["collage"]
    assert (rot["n"], rot["found"], rot["cluster"], dict(rot["lost"])) == (2, 1, 1, {"confirm": 1})
    assert (col["n"], col["found"], col["cluster"], dict(col["lost"])) == (2, 0, 1, {"verify": 1, "screen": 1})
    assert col["capped"] == 1 and dict(col["rules"]) == {"verify_orb_reject": 1}
    assert (r["duplicate_pairs"], r["false_pairs"], r["tile_pairs"]) == (4, 1, 2)
    assert r["false_by_edits"] == {"original + rot5": 1} and r["false_rules"] == {"verify_orb_accept": 1}
    table = edit_types.edit_table({"default": r})
    assert "| rot5 | 0.500 (1/2) | 0.500 (1/2) | confirm 1 (cosine_low) |" in table
    assert "| collage | 0.000 (0/2) | 0.500 (1/2) | screen 1 (1 capped), verify 1 (orb_reject) |" in table
    assert "| **all edits** | 0.250 (1/4) | 0.500 (2/4) | screen 1, verify 1, confirm 1 |" in table
    with pytest.raises(ValueError, match="labels.csv does not"):
        edit_types.score(pairs.assign(path_b="other.jpg"), labels)


def test_edit_types_batches_split_the_edit_types_evenly_in_order():
    from bench import edit_types
    edits = list(edit_types.EDITS)
    runs = edit_types.batches(edits, 6)
    assert [len(r) for r in runs] == [6, 6, 5, 5, 5, 5, 5] and sum(runs, []) == edits
    assert [len(r) for r in edit_types.batches(list("abcdefghij"), 3)] == [3, 3, 2, 2]
    assert edit_types.batches(edits, 0) == edit_types.batches(edits, len(edits)) == [edits]
    assert edit_types._per_run("all") == edit_types._per_run("0") == 0 and edit_types._per_run("6") == 6


def test_edit_types_batch_folder_links_the_originals_and_its_edits_only(tmp_path):
    from bench import edit_types
    data = tmp_path / "set"
    for rel in ("original/g0.jpg", "original/g1.png", "rot5/g0.jpg", "mirror/g0.jpg", "labels.csv"):
        (data / rel).parent.mkdir(parents=True, exist_ok=True)
        (data / rel).write_bytes(rel.encode())
    dest = tmp_path / "runs" / "run00"
    (dest / "stale").mkdir(parents=True)
    edit_types.link_batch(data, dest, ["rot5"])
    files = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
    assert files == ["original/g0.jpg", "original/g1.png", "rot5/g0.jpg"] and not (dest / "stale").exists()
    assert all((dest / f).stat().st_ino == (data / f).stat().st_ino for f in files)  # hard links, not copies


def test_edit_types_merge_takes_each_edit_from_its_run_and_counts_a_pair_once(tmp_path):
    """Two runs, each with both originals and one edit type; both runs pair the two originals
    (falsely): merged, that false pair counts once, each edit keeps its run's figures."""
    import types

    import pandas as pd

    from bench import edit_types
    labels = pd.DataFrame([
        ("original/g0.jpg", "g0", "original", "x.jpg"), ("original/g1.jpg", "g1", "original", "y.jpg"),
        ("rot5/g0.jpg", "g0", "rot5", "x.jpg"), ("rot5/g1.jpg", "g1", "rot5", "y.jpg"),
        ("mirror/g0.jpg", "g0", "mirror", "x.jpg"), ("mirror/g1.jpg", "g1", "mirror", "y.jpg"),
    ], columns=["path", "group_id", "edit", "shows"])
    cols = ["path_a", "path_b", "is_duplicate", "rule"]
    oo = ("original/g0.jpg", "original/g1.jpg", True, "confirm_cosine_orb")
    run1 = pd.DataFrame([oo, ("original/g0.jpg", "rot5/g0.jpg", True, "verify_orb_accept"),
                         ("original/g1.jpg", "rot5/g1.jpg", True, "verify_orb_accept")], columns=cols)
    run2 = pd.DataFrame([oo, ("mirror/g0.jpg", "original/g0.jpg", True, "verify_orb_accept"),
                         ("mirror/g0.jpg", "original/g1.jpg", True, "verify_orb_accept")], columns=cols)
    parts = [edit_types.score(run, labels[labels["edit"].isin(["original", e])]) for run, e in
             [(run1, "rot5"), (run2, "mirror")]]
    r = edit_types.merge(parts)
    assert {e: (v["n"], v["found"]) for e, v in r["edits"].items()} == {"rot5": (2, 2), "mirror": (2, 1)}
    assert r["edits"]["mirror"]["lost"] == {"screen": 1}
    assert (r["duplicate_pairs"], r["false_pairs"]) == (5, 2)
    assert r["false_by_edits"] == {"original + original": 1, "mirror + original": 1}
    with pytest.raises(ValueError, match="more than one run"):
        edit_types.merge([parts[0], parts[0]])
    args = types.SimpleNamespace(seed=0, edits_per_run=1)
    text = edit_types.section({"default": r}, {"default": 12.0}, labels, args, ["python -m pipeline dedupe DIR"],
                              [["rot5"], ["mirror"]])
    assert "Mode: batches of edit types** (`--edits-per-run 1`)" in text and "rot5 | mirror" in text
    assert "| default | 5 | 2 | mirror + original 1, original + original 1 |" in text and "run wall s (2 runs)" in text
    one = edit_types.section({"default": r}, {"default": 12.0}, labels, args, ["python -m pipeline dedupe DIR"])
    assert "Mode: one folder" in one and "every original has 2 copies" in one
