"""The speed benchmarks' own logic: the fastdup comparison skips cleanly without its virtualenv,
and the profile attributes each sample to the innermost known activity."""
from __future__ import annotations

from bench import fastdup, profile


def test_fastdup_benchmark_skips_without_its_virtualenv(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(fastdup, "FASTDUP_VENV", tmp_path / "missing")
    out = tmp_path / "benchmarks.md"
    assert fastdup.main(["--sizes", "small", "--rounds", "1", "--out", str(out)]) == 0
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
                       _node("/x/pipeline/verify.py", "_match_kernel", 25), _node("/x/pipeline/verify.py", "_ransac", 10)))
    got = profile.categorise(tree)
    assert got["decode"] == 15 and got["resize"] == 5 and got["ORB features"] == 30
    assert got["Parquet / serialisation"] == 4 and got["matching"] == 25 and got["RANSAC"] == 10
    assert sum(got.values()) == 100  # 6 + 5 own samples of the two task frames go to "other"
