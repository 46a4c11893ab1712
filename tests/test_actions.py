"""plan -> apply -> undo on real files: a real run over real photos and copies, then the CLI."""
from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from pipeline.actions import PLAN_COLUMNS, read_plan
from pipeline.cli import main


def snapshot(root: Path) -> dict:
    """Every path under root -> (kind, sha256 of the bytes, link count, mtime_ns)."""
    out = {}
    for folder, _, files in os.walk(root):
        for name in files:
            p = Path(folder) / name
            st = os.lstat(p)
            kind = "symlink" if p.is_symlink() else "file"
            out[str(p.relative_to(root))] = (kind, hashlib.sha256(p.read_bytes()).hexdigest(), st.st_nlink,
                                             st.st_mtime_ns)
    return out


@pytest.fixture()
def run_dir(photo_paths, tmp_path):
    """DATA: two photos with copies (exact, re-encoded, resized) and a singleton; OUT of a real run
    (screen tier); the plan beside it (outside DATA). Returns tmp_path."""
    data = tmp_path / "data"
    for sub in ("originals", "copies", "other"):
        (data / sub).mkdir(parents=True)
    a, b, c = photo_paths[0], photo_paths[len(photo_paths) // 2], photo_paths[-1]
    (data / "originals" / "a.jpg").write_bytes(a.read_bytes())
    (data / "copies" / "a_copy.jpg").write_bytes(a.read_bytes())
    img = Image.open(a).convert("RGB")
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=60)
    (data / "copies" / "a_q60.jpg").write_bytes(buf.getvalue())
    (data / "originals" / "b.jpg").write_bytes(b.read_bytes())
    small = Image.open(b).convert("RGB")
    small.resize((small.width // 2, small.height // 2)).save(data / "copies" / "b_half.jpg", quality=90)
    (data / "other" / "c.jpg").write_bytes(c.read_bytes())
    assert main(["dedupe", str(data), "--out", str(tmp_path / "out"), "--tiers", "screen", "--scheduler", "sync",
                 "--quiet"]) == 0
    assert main(["plan", str(tmp_path / "out"), "--keep", "preferred_folder", "--prefer", "originals",
                 "--output", str(tmp_path / "plan.parquet")]) == 0
    return tmp_path


def test_plan_rows(run_dir, capsys):
    plan = read_plan(run_dir / "plan.parquet")
    assert list(plan.columns) == PLAN_COLUMNS
    assert sorted(plan["path"]) == ["copies/a_copy.jpg", "copies/a_q60.jpg", "copies/b_half.jpg",
                                    "originals/a.jpg", "originals/b.jpg"]
    assert sorted(plan.loc[plan["action"] == "keep", "path"]) == ["originals/a.jpg", "originals/b.jpg"]
    assert plan.groupby("cluster_id")["action"].apply(lambda s: (s == "keep").sum()).eq(1).all()
    for r in plan.itertuples():
        assert Path(r.abs_path).is_file() and r.sha256 == hashlib.sha256(Path(r.abs_path).read_bytes()).hexdigest()
        assert r.bytes == Path(r.abs_path).stat().st_size
        assert r.keeper == ("originals/a.jpg" if Path(r.path).stem.startswith("a") else "originals/b.jpg")
    # CSV holds the same plan
    assert main(["plan", str(run_dir / "out"), "--keep", "preferred_folder", "--prefer", "originals",
                 "--output", str(run_dir / "plan.csv")]) == 0
    pd.testing.assert_frame_equal(read_plan(run_dir / "plan.csv"), plan, check_dtype=False)
    # another policy, another keeper
    assert main(["plan", str(run_dir / "out"), "--keep", "shortest_path", "--output", str(run_dir / "p2.csv")]) == 0
    p2 = read_plan(run_dir / "p2.csv")
    assert sorted(p2.loc[p2["action"] == "keep", "path"]) == ["originals/a.jpg", "originals/b.jpg"]
    # a preferred folder that holds no file of the run (a typo): said, not silently ignored
    capsys.readouterr()
    assert main(["plan", str(run_dir / "out"), "--keep", "preferred_folder", "--prefer", "orignals",
                 "--prefer", "originals", "--output", str(run_dir / "p3.csv")]) == 0
    err = capsys.readouterr().err
    assert "--prefer 'orignals' holds none of the run's files" in err and "'originals'" not in err
    # an --output that cannot be written: exit 2 with a message, not a traceback
    (run_dir / "a-file").write_text("")
    assert main(["plan", str(run_dir / "out"), "--keep", "shortest_path", "--output",
                 str(run_dir / "a-file" / "plan.csv")]) == 2
    # a file:// URL is the local folder (OUT/plan.parquet there, and apply reads it as a local plan)
    assert main(["plan", f"file://{run_dir / 'out'}", "--keep", "shortest_path"]) == 0
    assert (run_dir / "out" / "plan.parquet").is_file() and not Path("file:").exists()
    assert main(["apply", f"file://{run_dir / 'out' / 'plan.parquet'}", "--action", "delete"]) == 0


def test_dry_run_changes_nothing(run_dir, capsys):
    before = snapshot(run_dir / "data")
    for action, extra in (("delete", []), ("move", ["--to", str(run_dir / "moved")]), ("hardlink", []),
                          ("symlink", [])):
        assert main(["apply", str(run_dir / "plan.parquet"), "--action", action, *extra]) == 0
        printed = capsys.readouterr().out
        assert printed.count("\nwould ") + printed.startswith("would ") == 3
        assert "dry run: nothing changed" in printed
    assert snapshot(run_dir / "data") == before
    assert not (run_dir / "moved").exists() and not list(run_dir.glob("undo-*"))


@pytest.mark.parametrize("action", ["move", "hardlink", "symlink", "delete"])
def test_apply_then_undo_restores_the_tree_byte_for_byte(run_dir, action, capsys):
    data = run_dir / "data"
    before = snapshot(data)
    log = run_dir / "logs" / "undo.jsonl"
    extra = ["--to", str(run_dir / "moved")] if action == "move" else []
    assert main(["apply", str(run_dir / "plan.parquet"), "--action", action, "--execute", "--log", str(log),
                 *extra]) == 0
    removed = ["copies/a_copy.jpg", "copies/a_q60.jpg", "copies/b_half.jpg"]
    keeper = {"copies/a_copy.jpg": "originals/a.jpg", "copies/a_q60.jpg": "originals/a.jpg",
              "copies/b_half.jpg": "originals/b.jpg"}
    after = snapshot(data)
    for k in ("originals/a.jpg", "originals/b.jpg", "other/c.jpg"):
        assert after[k][:2] == before[k][:2]  # keepers and singletons untouched
    for r in removed:
        if action == "move":
            assert r not in after and hashlib.sha256((run_dir / "moved" / r).read_bytes()).hexdigest() == before[r][1]
        elif action == "delete":
            assert r not in after
            assert hashlib.sha256((run_dir / "logs" / "undo.trash" / r).read_bytes()).hexdigest() == before[r][1]
        elif action == "hardlink":
            assert os.path.samefile(data / r, data / keeper[r]) and after[r][2] >= 2
        else:
            assert (data / r).is_symlink() and os.path.samefile(data / r, data / keeper[r])
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    assert [e["op"] for e in entries] == [action] * 3 and sorted(e["path"] for e in entries) == removed

    capsys.readouterr()
    assert main(["undo", str(log)]) == 0
    assert "3 restored" in capsys.readouterr().out
    assert snapshot(data) == before  # same paths, bytes, kinds, link counts, mtimes
    assert not (run_dir / "logs" / "undo.trash").exists()
    assert main(["undo", str(log)]) == 0  # again: nothing left to do, nothing broken
    assert snapshot(data) == before


def test_a_plan_older_than_the_run_in_out_is_flagged(run_dir, capsys):
    """OUT/plan.parquet records its run: applied after a later run into OUT, `apply` warns that the
    clusters may have changed (each file is still checked before anything is done)."""
    out = run_dir / "out"
    assert main(["plan", str(out), "--keep", "largest_file"]) == 0
    capsys.readouterr()
    assert main(["apply", str(out / "plan.parquet"), "--action", "delete"]) == 0  # (a dry run)
    assert "warning" not in capsys.readouterr().err
    assert main(["dedupe", str(run_dir / "data"), "--out", str(out), "--tiers", "screen", "--scheduler", "sync",
                 "--quiet"]) == 0
    capsys.readouterr()
    assert main(["apply", str(out / "plan.parquet"), "--action", "delete"]) == 0
    err = capsys.readouterr().err
    assert "warning: the plan was made for run" in err and "make a new plan" in err


def test_move_into_the_scanned_folder_is_refused(run_dir, capsys):
    """--to inside DATA: the next nightly run would find the moved files again (and the next plan
    would move them into DATA/_dupes/_dupes/...)."""
    before = snapshot(run_dir / "data")
    assert main(["apply", str(run_dir / "plan.parquet"), "--action", "move", "--to", str(run_dir / "data" / "_dupes"),
                 "--execute", "--log", str(run_dir / "undo.jsonl")]) == 2
    assert "inside the scanned folder" in capsys.readouterr().err
    assert snapshot(run_dir / "data") == before and not (run_dir / "undo.jsonl").exists()


def test_undo_restores_nothing_that_changed_since_apply(run_dir, capsys):
    """undo restores byte for byte or not at all: a trashed or moved file edited since `apply`
    stays where it is, named on stderr (exit 1); the others are restored."""
    data = run_dir / "data"
    log = run_dir / "undo.jsonl"
    assert main(["apply", str(run_dir / "plan.parquet"), "--action", "delete", "--execute", "--log", str(log)]) == 0
    edited = run_dir / "undo.trash" / "copies" / "a_q60.jpg"
    with open(edited, "ab") as fh:
        fh.write(b"edited in the trash")
    capsys.readouterr()
    assert main(["undo", str(log)]) == 1
    err = capsys.readouterr().err
    assert "copies/a_q60.jpg" in err and "changed since `apply`" in err
    assert edited.is_file() and not (data / "copies" / "a_q60.jpg").exists()
    assert (data / "copies" / "a_copy.jpg").is_file() and (data / "copies" / "b_half.jpg").is_file()


def test_a_file_edited_after_the_run_is_refused(run_dir, capsys):
    data = run_dir / "data"
    with open(data / "copies" / "a_q60.jpg", "ab") as f:
        f.write(b"edited")
    os.utime(data / "copies" / "b_half.jpg", (1_000_000_000, 1_000_000_000))  # touched, same bytes
    before = snapshot(data)
    code = main(["apply", str(run_dir / "plan.parquet"), "--action", "delete", "--execute",
                 "--log", str(run_dir / "undo.jsonl")])
    err = capsys.readouterr().err
    assert code == 1
    assert "refused: copies/a_q60.jpg: changed since the run: size" in err
    assert "refused: copies/b_half.jpg: changed since the run: modified 2001-09-09" in err
    after = snapshot(data)
    assert "copies/a_copy.jpg" not in after  # the unchanged one went ahead
    assert after["copies/a_q60.jpg"] == before["copies/a_q60.jpg"]
    assert after["copies/b_half.jpg"] == before["copies/b_half.jpg"]


def test_same_bytes_new_content_is_refused_by_sha256(run_dir, capsys):
    f = run_dir / "data" / "copies" / "a_copy.jpg"
    st = f.stat()
    raw = bytearray(f.read_bytes())
    raw[-3] ^= 0xFF  # same size, same mtime after utime: only the hash tells
    f.write_bytes(bytes(raw))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert main(["apply", str(run_dir / "plan.parquet"), "--action", "delete"]) == 1
    assert "refused: copies/a_copy.jpg: changed since the run: content (sha256) differs" in capsys.readouterr().err


def test_never_the_last_copy(run_dir, capsys):
    data = run_dir / "data"
    (data / "originals" / "b.jpg").unlink()  # the keeper of cluster b is gone
    code = main(["apply", str(run_dir / "plan.parquet"), "--action", "delete", "--execute",
                 "--log", str(run_dir / "undo.jsonl")])
    err = capsys.readouterr().err
    assert code == 1
    assert ("refused: copies/b_half.jpg: the keeper originals/b.jpg is missing: nothing removed from this "
            "cluster") in err
    assert (data / "copies" / "b_half.jpg").is_file()
    assert not (data / "copies" / "a_copy.jpg").exists()  # the other cluster went ahead


def test_a_hard_link_of_the_keeper_is_not_removed(photo_paths, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.jpg").write_bytes(photo_paths[0].read_bytes())
    os.link(data / "a.jpg", data / "z_alias.jpg")  # one file, two names
    assert main(["dedupe", str(data), "--out", str(tmp_path / "out"), "--tiers", "screen", "--scheduler", "sync",
                 "--quiet"]) == 0
    assert main(["plan", str(tmp_path / "out"), "--keep", "shortest_path"]) == 0
    before = snapshot(data)
    assert main(["apply", str(tmp_path / "out" / "plan.parquet"), "--action", "delete", "--execute"]) == 1
    assert "refused: z_alias.jpg: is the keeper's own file under another name" in capsys.readouterr().err
    assert snapshot(data) == before
    assert not list((tmp_path / "out").glob("undo-*"))  # nothing done: no log


def test_move_onto_an_existing_file_fails_and_keeps_both(run_dir, capsys):
    (run_dir / "moved" / "copies").mkdir(parents=True)
    (run_dir / "moved" / "copies" / "a_copy.jpg").write_bytes(b"someone else's")
    code = main(["apply", str(run_dir / "plan.parquet"), "--action", "move", "--to", str(run_dir / "moved"),
                 "--execute", "--log", str(run_dir / "undo.jsonl")])
    assert code == 1 and "failed: copies/a_copy.jpg: destination" in capsys.readouterr().err
    assert (run_dir / "data" / "copies" / "a_copy.jpg").is_file()
    assert (run_dir / "moved" / "copies" / "a_copy.jpg").read_bytes() == b"someone else's"
    assert main(["undo", str(run_dir / "undo.jsonl")]) == 0
    assert (run_dir / "data" / "copies" / "a_q60.jpg").is_file()


def test_usage_errors_exit_2(run_dir, tmp_path, capsys):
    plan = str(run_dir / "plan.parquet")
    assert main(["plan", str(tmp_path / "nope"), "--keep", "oldest"]) == 2
    assert main(["plan", str(run_dir / "out"), "--keep", "preferred_folder"]) == 2
    assert main(["plan", str(run_dir / "out"), "--keep", "oldest", "--output", str(tmp_path / "p.txt")]) == 2
    assert main(["apply", plan, "--action", "move"]) == 2
    assert main(["apply", plan, "--action", "delete", "--to", str(tmp_path)]) == 2
    assert main(["apply", str(tmp_path / "none.parquet"), "--action", "delete"]) == 2
    assert main(["undo", str(tmp_path / "none.jsonl")]) == 2
    with pytest.raises(SystemExit) as exc:
        main(["apply", plan, "--action", "shred"])
    assert exc.value.code == 2
    assert "--to DIR is needed with --action move" in capsys.readouterr().err


@pytest.mark.parametrize("plan_name,action,folder", [("plan.parquet", "hardlink", "data"), ("plan.csv", "move", "data"),
                                                     ("plan.parquet", "delete", "data"),
                                                     ("plan.csv", "symlink", "data"),
                                                     ("plan.csv", "delete", os.fsdecode(b"d\xe9/data"))])
def test_names_that_are_not_utf8_are_acted_on_and_restored(photo_paths, tmp_path, capsys, plan_name, action, folder):
    """A name that is not valid UTF-8 (a Latin-1 archive) is in the outputs as its text form, which
    names no file: the plan keeps the exact bytes (raw_path; hexadecimal in a CSV plan), so such a
    keeper is found and such a copy is acted on, and undo puts every byte of the tree back. The
    scanned folder's own path may be such a name too (`paths.os_folder`)."""
    data = tmp_path / folder
    (data / "originals").mkdir(parents=True)
    (data / "copies").mkdir()
    a, b = photo_paths[0], photo_paths[len(photo_paths) // 2]
    keeper_raw = os.path.join(os.fsencode(data), b"originals", b"caf\xe9-a.jpg")  # Latin-1 "café"
    with open(keeper_raw, "wb") as f:
        f.write(a.read_bytes())
    (data / "copies" / "a_copy.jpg").write_bytes(a.read_bytes())
    (data / "originals" / "b.jpg").write_bytes(b.read_bytes())
    copy_raw = os.path.join(os.fsencode(data), b"copies", b"b-\xff\xfe-copy.jpg")
    with open(copy_raw, "wb") as f:
        f.write(b.read_bytes())
    out = tmp_path / "out"
    assert main(["dedupe", str(data), "--out", str(out), "--tiers", "screen", "--scheduler", "sync", "--quiet"]) == 0
    assert main(["plan", str(out), "--keep", "preferred_folder", "--prefer", "originals",
                 "--output", str(tmp_path / plan_name)]) == 0
    plan = read_plan(tmp_path / plan_name)
    raw = dict(zip(plan["path"], plan["raw_path"]))
    assert raw == {"originals/caf\\xe9-a.jpg": b"originals/caf\xe9-a.jpg", "copies/a_copy.jpg": None,
                   "originals/b.jpg": None, "copies/b-\\xff\\xfe-copy.jpg": b"copies/b-\xff\xfe-copy.jpg"}
    before = snapshot(data)
    log = tmp_path / "logs" / "undo.jsonl"
    extra = ["--to", str(tmp_path / "moved")] if action == "move" else []
    capsys.readouterr()
    assert main(["apply", str(tmp_path / plan_name), "--action", action, "--execute", "--log", str(log), *extra]) == 0
    assert "refused" not in capsys.readouterr().err
    after = snapshot(data)
    keeper_a, copy_b = os.fsdecode(b"originals/caf\xe9-a.jpg"), os.fsdecode(b"copies/b-\xff\xfe-copy.jpg")
    assert after[keeper_a][:2] == before[keeper_a][:2] and after["originals/b.jpg"][:2] == before["originals/b.jpg"][:2]
    for removed, keeper in (("copies/a_copy.jpg", keeper_a), (copy_b, "originals/b.jpg")):
        if action == "move":
            assert removed not in after and (tmp_path / "moved" / removed).read_bytes() == (data / keeper).read_bytes()
        elif action == "delete":
            assert removed not in after and (log.parent / "undo.trash" / removed).is_file()
        else:
            assert os.path.samefile(data / removed, data / keeper) and (data / removed).is_symlink() == (action == "symlink")
    assert main(["undo", str(log)]) == 0
    assert snapshot(data) == before  # the same names, byte for byte


def test_a_plan_made_before_raw_path_existed_still_applies(run_dir, capsys):
    """A plan without the raw_path column (an older one, or one a script wrote) reads as all names
    UTF-8 and applies as before."""
    plan = pd.read_parquet(run_dir / "plan.parquet").drop(columns=["raw_path"])
    plan.to_parquet(run_dir / "old.parquet", index=False)
    assert read_plan(run_dir / "old.parquet")["raw_path"].isna().all()
    capsys.readouterr()
    assert main(["apply", str(run_dir / "old.parquet"), "--action", "delete"]) == 0
    assert capsys.readouterr().out.count("would delete:") == 3
    plan.assign(raw_path="not hex").to_csv(run_dir / "bad.csv", index=False)
    assert main(["apply", str(run_dir / "bad.csv"), "--action", "delete"]) == 2
    assert "raw_path holds a value that is not hexadecimal" in capsys.readouterr().err


def test_a_csv_plan_keeps_raw_names_whose_hexadecimal_looks_like_a_number(run_dir):
    """Hexadecimal of digits only ("99") or of a float's shape ("1e5") is read back as bytes, not
    as a number that would lose the name."""
    from pipeline.actions import write_plan
    plan = read_plan(run_dir / "plan.parquet")
    raws = [b"\x99", b"\x1e\x05", None, b"\x12\x96", None][:len(plan)]
    plan["raw_path"] = pd.Series(raws + [None] * (len(plan) - len(raws)), dtype=object)
    root = plan["abs_path"].iloc[0][:-len(plan["path"].iloc[0])]  # (a raw name's path is its text form)
    plan["path"] = [r.decode("utf-8", "backslashreplace") if r is not None else p
                    for r, p in zip(plan["raw_path"], plan["path"])]
    plan["abs_path"] = root + plan["path"]
    from pipeline.run import image_ids  # (a plan's image_id is its name's: `check_plan`)
    plan["image_id"] = image_ids([r if r is not None else p for r, p in zip(plan["raw_path"], plan["path"])])
    write_plan(plan, run_dir / "digits.csv")
    assert read_plan(run_dir / "digits.csv")["raw_path"].tolist() == plan["raw_path"].tolist()


@pytest.mark.parametrize("edit, why", [
    ("keeper_copied", "listed more than once"),  # cluster a's keeper as a "remove" row of cluster b
    ("outside", "not inside the scanned folder"),  # a file that was never in the run
    ("abs_path", "abs_path is not the scanned folder's"),
    ("image_id", "image_id is not their path's"),
    ("no_cluster", "without a cluster_id"),
    ("raw_path", "raw_path is not the bytes of their path"),  # (it named ../elsewhere.jpg, which was moved)
])
def test_a_plan_edited_beyond_its_action_column_is_refused(run_dir, capsys, edit, why):
    """A plan may be edited in its action column only: rows that are not the run's files, each
    once, are refused before anything is done (a keeper copied into another cluster as "remove"
    removed every copy of its own cluster, exit 0)."""
    plan = read_plan(run_dir / "plan.parquet")
    keeper_a = plan[(plan["action"] == "keep") & (plan["path"] == "originals/a.jpg")]
    other = plan["cluster_id"].loc[plan["path"] == "originals/b.jpg"].iloc[0]
    outside = run_dir / "elsewhere.jpg"
    outside.write_bytes((run_dir / "data" / "originals" / "a.jpg").read_bytes())
    if edit == "keeper_copied":
        plan = pd.concat([plan, keeper_a.assign(action="remove", cluster_id=other)], ignore_index=True)
    elif edit == "outside":
        plan = pd.concat([plan, keeper_a.assign(action="remove", path="../elsewhere.jpg",
                                                abs_path=str(run_dir / "data" / ".." / "elsewhere.jpg"))],
                         ignore_index=True)
    elif edit == "abs_path":
        plan.loc[plan["path"] == "copies/a_copy.jpg", "abs_path"] = str(outside)
    elif edit == "image_id":  # (another file of the folder, not in the run, put in a row's place)
        at = plan["path"] == "copies/a_copy.jpg"
        plan.loc[at, "abs_path"] = str(run_dir / "data" / "other" / "c.jpg")
        plan.loc[at, "path"] = "other/c.jpg"
    elif edit == "raw_path":  # (as a CSV plan holds it: hexadecimal)
        plan["raw_path"] = [b"../elsewhere.jpg".hex() if p == "copies/a_copy.jpg" else None for p in plan["path"]]
    else:
        plan["cluster_id"] = plan["cluster_id"].astype("Int64")
        plan.loc[plan["path"] == "copies/a_copy.jpg", "cluster_id"] = pd.NA
    plan.to_csv(run_dir / "edited.csv", index=False)
    before = snapshot(run_dir / "data")
    capsys.readouterr()
    assert main(["apply", str(run_dir / "edited.csv"), "--action", "delete", "--execute",
                 "--log", str(run_dir / "undo.jsonl")]) == 2
    err = capsys.readouterr().err
    assert why in err and "dedupe plan" in err
    assert snapshot(run_dir / "data") == before and outside.is_file() and not (run_dir / "undo.jsonl").exists()


def test_a_symlink_in_a_folder_reached_through_a_link_reaches_the_keeper(photo_paths, tmp_path, capsys):
    """The scan follows a linked folder; a symlink put in it points at the keeper from the real
    folder (a path relative to the link's name pointed beside it, and dangled)."""
    data, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    data.mkdir()
    elsewhere.mkdir()
    (data / "k0.jpg").write_bytes(photo_paths[0].read_bytes())
    (elsewhere / "r0.jpg").write_bytes(photo_paths[0].read_bytes())
    (data / "sd").mkdir()
    (data / "sd" / "ext").symlink_to(elsewhere, target_is_directory=True)
    assert main(["dedupe", str(data), "--out", str(tmp_path / "out"), "--tiers", "screen", "--scheduler", "sync",
                 "--quiet"]) == 0
    assert main(["plan", str(tmp_path / "out"), "--keep", "shortest_path"]) == 0
    plan = read_plan(tmp_path / "out" / "plan.parquet")
    assert sorted(plan["path"]) == ["k0.jpg", "sd/ext/r0.jpg"]
    log = tmp_path / "undo.jsonl"
    assert main(["apply", str(tmp_path / "out" / "plan.parquet"), "--action", "symlink", "--execute",
                 "--log", str(log)]) == 0
    assert (elsewhere / "r0.jpg").is_symlink() and os.path.samefile(elsewhere / "r0.jpg", data / "k0.jpg")
    assert main(["undo", str(log)]) == 0
    assert not (elsewhere / "r0.jpg").is_symlink()
    assert (elsewhere / "r0.jpg").read_bytes() == photo_paths[0].read_bytes()


def test_undo_works_from_anywhere_with_a_relative_log(run_dir, capsys, monkeypatch):
    """A relative --log: the log holds absolute paths (its trash's too), so `undo` works from
    another folder."""
    before = snapshot(run_dir / "data")
    monkeypatch.chdir(run_dir)
    assert main(["apply", "plan.parquet", "--action", "delete", "--execute", "--log", "logs/u.jsonl"]) == 0
    monkeypatch.chdir("/")
    assert main(["undo", str(run_dir / "logs" / "u.jsonl")]) == 0
    assert snapshot(run_dir / "data") == before


def test_the_trash_is_never_put_in_the_scanned_folder(run_dir, capsys):
    """A plan kept in DATA (its default undo log, and the trash beside it, would be there), or a
    --log in DATA: refused like --to in DATA, as the next run would find the trashed files."""
    data = run_dir / "data"
    before = snapshot(data)
    assert main(["plan", str(run_dir / "out"), "--keep", "preferred_folder", "--prefer", "originals",
                 "--output", str(data / "plan.csv")]) == 0
    before = snapshot(data)
    for args in (["apply", str(data / "plan.csv"), "--action", "delete", "--execute"],
                 ["apply", str(run_dir / "plan.parquet"), "--action", "symlink", "--log", str(data / "u.jsonl")]):
        capsys.readouterr()
        assert main(args) == 2
        assert "inside the scanned folder" in capsys.readouterr().err
        assert snapshot(data) == before
    # a move's log may lie there (it holds no image); its files go to --to
    assert main(["apply", str(data / "plan.csv"), "--action", "move", "--to", str(run_dir / "moved")]) == 0


def test_undo_after_a_move_to_another_file_system_was_stopped(run_dir, capsys):
    """A delete whose trash is on another file system copies, then removes the original: stopped
    in between (here: the copy made, or half made, the original still there), `undo` sees the
    original in place, removes apply's copy, and reports no failure; it stays harmless twice."""
    data = run_dir / "data"
    before = snapshot(data)
    log = run_dir / "undo.jsonl"
    assert main(["apply", str(run_dir / "plan.parquet"), "--action", "delete", "--execute", "--log", str(log)]) == 0
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    for n, e in enumerate(entries):  # each original back in place, as if its removal never happened,
        os.rename(e["trash"], e["src"])  # (the same file: a copy put back by hand is another, below)
        Path(e["trash"]).write_bytes(Path(e["src"]).read_bytes())  # beside apply's copy
        if n == 0:  # and the first copy cut short
            with open(e["trash"], "r+b") as fh:
                fh.truncate(100)
    capsys.readouterr()
    assert main(["undo", str(log)]) == 0
    out = capsys.readouterr()
    assert "not restored" not in out.err and out.out.count("in place") == len(entries)
    assert snapshot(data) == before and not (run_dir / "undo.trash").exists()
    assert main(["undo", str(log)]) == 0


def test_undo_leaves_a_link_it_did_not_make(run_dir, capsys):
    """After a symlink apply, a user's own link put at that path is left alone by `undo` (it
    removed any link there), and a torn last line of the log (a machine that stopped as it was
    written) is skipped with a warning, the rest restored."""
    data = run_dir / "data"
    log = run_dir / "undo.jsonl"
    assert main(["apply", str(run_dir / "plan.parquet"), "--action", "symlink", "--execute", "--log", str(log)]) == 0
    mine = data / "copies" / "a_copy.jpg"
    mine.unlink()
    mine.symlink_to(data / "other" / "c.jpg")
    with open(log, "a", encoding="utf-8") as fh:
        fh.write('{"time": "2026-01-01T00:00:00", "op": "sym')
    capsys.readouterr()
    assert main(["undo", str(log)]) == 1
    err = capsys.readouterr().err
    assert "cut short" in err and "copies/a_copy.jpg" in err and "not the link `apply` made" in err
    assert mine.is_symlink() and os.readlink(mine) == str(data / "other" / "c.jpg")
    assert not (data / "copies" / "a_q60.jpg").is_symlink() and not (data / "copies" / "b_half.jpg").is_symlink()


def test_two_applies_at_once_write_two_logs(run_dir):
    from pipeline.actions import default_log_path
    assert default_log_path(run_dir / "plan.parquet") != default_log_path(run_dir / "plan.parquet")


@pytest.mark.parametrize("damage, message", [
    ("run.json:not json", "run.json cannot be read"),
    ("run.json:[1, 2]", "is not a dedupe run.json"),
    ("images.parquet:not parquet", "images.parquet cannot be read"),
    ("pairs.parquet:", "pairs.parquet cannot be read"),  # (removed)
])
def test_plan_and_report_on_a_damaged_out_say_what_is_wrong(run_dir, capsys, damage, message):
    """A run.json or Parquet file that cannot be read: exit 2 naming the file and what to do (a
    traceback, exit 1, or the bare path before)."""
    import shutil as sh
    out = run_dir / "damaged"
    sh.copytree(run_dir / "out", out, symlinks=True)
    name, text = damage.split(":", 1)
    from pipeline import outdir  # (the files themselves, in the generation OUT's names lead to)
    target = (outdir.current_generation(out) or out) / name
    if target.is_symlink() or target.exists():
        target.unlink()
    if text:
        target.write_text(text)
    for args in (["plan", str(out), "--keep", "largest_file", "--output", str(run_dir / "p.csv")],
                 ["report", str(out)]):
        capsys.readouterr()
        assert main(args) == 2
        err = capsys.readouterr().err
        assert message in err and "run the job again" in err and "Traceback" not in err


def test_a_csv_plan_keeps_files_named_like_missing_values(photo_paths, tmp_path, capsys):
    """pandas reads "NA", "null", "nan", "None" as missing: a CSV plan with a file of such a name
    was refused ("rows without a path"), and making it again gave the same plan."""
    data = tmp_path / "data"
    data.mkdir()
    for name in ("NA", "null", "nan.jpg"):
        (data / name).write_bytes(photo_paths[0].read_bytes())
    assert main(["dedupe", str(data), "--out", str(tmp_path / "out"), "--tiers", "screen", "--scheduler", "sync",
                 "--quiet"]) == 0
    assert main(["plan", str(tmp_path / "out"), "--keep", "shortest_path", "--output", str(tmp_path / "plan.csv")]) == 0
    plan = read_plan(tmp_path / "plan.csv")
    assert sorted(plan["path"]) == ["NA", "nan.jpg", "null"] and plan["raw_path"].isna().all()
    assert main(["apply", str(tmp_path / "plan.csv"), "--action", "delete", "--execute",
                 "--log", str(tmp_path / "undo.jsonl")]) == 0
    assert sorted(p.name for p in data.iterdir()) == ["NA"]
    assert main(["undo", str(tmp_path / "undo.jsonl")]) == 0
    assert sorted(p.name for p in data.iterdir()) == ["NA", "nan.jpg", "null"]


def test_a_move_that_fails_leaves_nothing_behind_and_a_full_disk_stops_apply(run_dir, capsys, monkeypatch):
    """shutil.move copies whenever a rename fails, whatever the reason: with a source folder that
    cannot be written, the copy was made, the removal failed, and the copy stayed in --to (every
    retry then failed: "destination exists"); on a full disk each file left a cut copy and apply
    went on with the next. Now a failed move leaves the source alone and nothing at the target,
    and apply stops at the first full-disk error."""
    import errno
    import shutil
    from pipeline import actions
    data = run_dir / "data"
    before = snapshot(data)
    real_rename, real_unlink = os.rename, os.unlink

    def cross_device(src, dst):  # (--to on another file system: every move copies)
        if str(src).startswith(str(data)):
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return real_rename(src, dst)

    def read_only_folder(path):  # (the source's folder cannot be written)
        if str(path).startswith(str(data)):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_unlink(path)

    monkeypatch.setattr(os, "rename", cross_device)
    monkeypatch.setattr(os, "unlink", read_only_folder)
    moved = run_dir / "moved"
    args = ["apply", str(run_dir / "plan.parquet"), "--action", "move", "--to", str(moved), "--execute",
            "--log", str(run_dir / "undo.jsonl")]
    assert main(args) == 1
    assert "Permission denied" in capsys.readouterr().err
    assert snapshot(data) == before and not [p for p in moved.rglob("*") if p.is_file()]
    monkeypatch.setattr(os, "unlink", real_unlink)  # (the folder made writable: a retry works)
    assert main(args[:-1] + [str(run_dir / "undo2.jsonl")]) == 0
    assert main(["undo", str(run_dir / "undo2.jsonl")]) == 0 and snapshot(data) == before

    copies = []

    def disk_full(src, dst, **kwargs):
        copies.append(dst)
        Path(dst).write_bytes(b"cut sh")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shutil, "copy2", disk_full)
    assert main(args[:-1] + [str(run_dir / "undo3.jsonl")]) == 1
    err = capsys.readouterr().err
    assert len(copies) == 1 and "No space left" in err and "stopped: no space left" in err
    assert snapshot(data) == before and not [p for p in moved.rglob("*") if p.is_file()]
    assert actions.move_file is not None


def test_a_dry_run_says_what_execute_would_fail_on(run_dir, capsys, monkeypatch):
    """The dry run said "3 would be done" where --execute then failed on every file: a source
    folder that cannot be written (nothing can be removed from it) and a --to that cannot be
    written are named first."""
    real_access = os.access
    locked = {str(run_dir / "data" / "copies"), str(run_dir / "moved")}
    monkeypatch.setattr(os, "access", lambda p, mode: str(p) not in locked and real_access(p, mode))
    (run_dir / "moved").mkdir()
    assert main(["apply", str(run_dir / "plan.parquet"), "--action", "move", "--to", str(run_dir / "moved")]) == 1
    out = capsys.readouterr()
    assert f"--to {str(run_dir / 'moved')!r}: {run_dir / 'moved'} cannot be written" in out.err
    assert out.err.count("would fail: its folder") == 3 and "0 would be done" in out.out


def test_each_command_says_what_it_does_and_its_exit_codes_and_the_undo_hint_can_be_pasted(run_dir, capsys):
    """plan, apply, undo and report had no description and no exit codes in --help; the undo
    hint said `dedupe` whatever the command was and left a log path with a space unquoted."""
    for command in ("plan", "apply", "undo", "report"):
        with pytest.raises(SystemExit) as done:
            main([command, "--help"])
        assert done.value.code == 0
        assert "exit codes:" in capsys.readouterr().out
    log = run_dir / "undo log.jsonl"
    assert main(["apply", str(run_dir / "plan.parquet"), "--action", "delete", "--execute", "--log", str(log)]) == 0
    assert f"undo '{log}')" in capsys.readouterr().out
    assert main(["undo", str(log)]) == 0


def test_a_log_that_exists_is_refused_and_left_as_it_was(run_dir, capsys):
    """--log naming a file that exists (a photo, by a slip of the shell): apply appended its JSON
    lines to it, and `undo` then refused the whole file as "not JSON"."""
    photo = run_dir / "data" / "other" / "c.jpg"
    before, data_before = photo.read_bytes(), snapshot(run_dir / "data")
    assert main(["apply", str(run_dir / "plan.parquet"), "--action", "delete", "--execute", "--log", str(photo)]) == 2
    assert "exists: each apply writes a log of its own" in capsys.readouterr().err
    assert photo.read_bytes() == before and snapshot(run_dir / "data") == data_before


def test_a_plan_row_edited_into_another_cluster_or_spelled_anew_is_refused(run_dir, capsys):
    """Only the action column may be edited. Refused now, each of which removed the only copy of
    a photo: a keeper listed again as "./originals/a.jpg" in another cluster (its image_id made
    for that text), an edited cluster_id merging two clusters under one keeper, and a row of a
    photo with no copy taken from images.parquet into a cluster (the last two: a Parquet plan,
    which names its run and OUT)."""
    from pipeline.run import image_ids
    plan = pd.read_parquet(run_dir / "plan.parquet")
    attrs = dict(plan.attrs)
    assert attrs.get("run_id") and attrs.get("out") == str(run_dir / "out")
    keeper_a = plan.index[plan["path"] == "originals/a.jpg"][0]
    keeper_b = plan.index[plan["path"] == "originals/b.jpg"][0]
    data_before = snapshot(run_dir / "data")

    def refused(edited: pd.DataFrame, needle: str) -> None:
        edited.attrs = attrs
        edited.to_parquet(run_dir / "edited.parquet")
        assert main(["apply", str(run_dir / "edited.parquet"), "--action", "delete", "--execute",
                     "--log", str(run_dir / f"undo-{len(list(run_dir.glob('undo-*')))}.jsonl")]) == 2
        err = capsys.readouterr().err
        assert needle in err, err
        assert snapshot(run_dir / "data") == data_before

    alias = plan.loc[[keeper_a]].assign(path="./originals/a.jpg", action="remove",
                                        cluster_id=plan.at[keeper_b, "cluster_id"],
                                        abs_path=str(run_dir / "data" / "." / "originals" / "a.jpg"),
                                        image_id=int(image_ids(["./originals/a.jpg"])[0]))
    refused(pd.concat([plan, alias], ignore_index=True), "paths listed more than once")
    merged = plan.copy()
    merged.loc[merged["cluster_id"] == plan.at[keeper_b, "cluster_id"], "cluster_id"] = plan.at[keeper_a, "cluster_id"]
    merged.loc[keeper_b, "action"] = "remove"
    refused(merged, "rows that are not in the cluster run")
    images = pd.read_parquet(run_dir / "out" / "images.parquet").set_index("path")
    lone = images.loc["other/c.jpg"]
    added = plan.loc[[keeper_a]].assign(path="other/c.jpg", action="remove", abs_path=str(run_dir / "data" / "other" / "c.jpg"),
                                        bytes=int(lone["bytes"]), sha256=lone["sha256"], image_id=int(lone["image_id"]),
                                        mtime=pd.Timestamp(lone["mtime"]))
    refused(pd.concat([plan, added], ignore_index=True), "rows that are not in the cluster run")
    # ids as floats (e.g. a pandas concat with a missing value): named as such, not as every row moved
    refused(plan.astype({"cluster_id": "float64"}), "its cluster_id column holds floating-point numbers")


def test_a_file_that_cannot_be_read_is_refused_and_the_rest_go_on(run_dir, capsys, monkeypatch):
    """A removal or a keeper this user cannot read: its sha256 raised PermissionError, a traceback
    that stopped the apply with files already acted on. (Raised by a stand-in for the read: the
    tests may run as root, whom file modes do not stop.)"""
    from pipeline import actions
    real = actions.sha256_file

    def reading(path):
        if str(path).endswith("a_q60.jpg"):
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(actions, "sha256_file", reading)
    log = run_dir / "undo.jsonl"
    assert main(["apply", str(run_dir / "plan.parquet"), "--action", "delete", "--execute", "--log", str(log)]) == 1
    err = capsys.readouterr().err
    assert "copies/a_q60.jpg" in err and "cannot be read (Permission denied)" in err and "Traceback" not in err
    assert (run_dir / "data" / "copies" / "a_q60.jpg").exists()
    assert not (run_dir / "data" / "copies" / "a_copy.jpg").exists()  # (the others went on)
    assert not (run_dir / "data" / "copies" / "b_half.jpg").exists()
    assert main(["undo", str(log)]) == 0


def test_a_move_to_the_scanned_folders_parent_that_lands_back_in_it_is_refused(photo_paths, tmp_path, capsys):
    """--to DATA's parent, with DATA holding a folder of its own name: data/data/y.jpg was moved
    to data/y.jpg, inside DATA again (the next run finds it)."""
    data = tmp_path / "data"
    (data / "data").mkdir(parents=True)
    (data / "x.jpg").write_bytes(photo_paths[0].read_bytes())
    (data / "data" / "y.jpg").write_bytes(photo_paths[0].read_bytes())
    assert main(["dedupe", str(data), "--out", str(tmp_path / "out"), "--tiers", "screen", "--scheduler", "sync",
                 "--quiet"]) == 0
    assert main(["plan", str(tmp_path / "out"), "--keep", "shortest_path"]) == 0
    before = snapshot(data)
    capsys.readouterr()
    assert main(["apply", str(tmp_path / "out" / "plan.parquet"), "--action", "move", "--to", str(tmp_path),
                 "--execute"]) == 2
    assert "would put it back inside that folder" in capsys.readouterr().err
    assert snapshot(data) == before


def test_undo_leaves_the_trash_alone_when_a_copy_was_put_back_by_hand(run_dir, capsys):
    """After a delete, the user copies a file back by hand (same bytes, a new file): undo took it
    for the original left in place by an interrupted copy and deleted the original from the trash
    (its modification time lost), exit 0. Now that copy is left alone and the original stays in
    the trash, named (exit 1); the other files are restored."""
    log = run_dir / "undo.jsonl"
    assert main(["apply", str(run_dir / "plan.parquet"), "--action", "delete", "--execute", "--log", str(log)]) == 0
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    mine = entries[0]
    Path(mine["src"]).write_bytes(Path(mine["trash"]).read_bytes())
    capsys.readouterr()
    assert main(["undo", str(log)]) == 1
    err = capsys.readouterr().err
    assert f"{mine['src']} exists and is another file: left alone" in err, err
    assert Path(mine["trash"]).exists()
    assert all(Path(e["src"]).exists() and not Path(e["trash"]).exists() for e in entries[1:])


def test_undo_does_not_make_a_missing_scanned_folder_again(run_dir, capsys):
    """DATA gone (an unmounted share): undo made its folders again and put the files there, where
    the share mounts over them. Now it names the folder and leaves the files in the trash."""
    data = run_dir / "data"
    log = run_dir / "undo.jsonl"
    assert main(["apply", str(run_dir / "plan.parquet"), "--action", "delete", "--execute", "--log", str(log)]) == 0
    os.rename(data, run_dir / "unmounted")
    capsys.readouterr()
    assert main(["undo", str(log)]) == 1
    assert "is not there (not mounted?)" in capsys.readouterr().err
    assert not data.exists()
    os.rename(run_dir / "unmounted", data)
    assert main(["undo", str(log)]) == 0
    assert not (run_dir / "undo.trash").exists()


def test_undo_removes_the_part_files_a_stopped_copy_left(run_dir, capsys, monkeypatch):
    """A copy to another file system stopped by a kill leaves `.<name>.<pid>.part` beside its
    destination: in the trash (apply stopped) or in DATA (undo stopped). They stayed, in the
    user's folder too; undo now removes those of processes that no longer run."""
    import subprocess
    import sys
    from pipeline import outdir
    log = run_dir / "undo.jsonl"
    assert main(["apply", str(run_dir / "plan.parquet"), "--action", "delete", "--execute", "--log", str(log)]) == 0
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()  # (a pid no process has now)
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    left = [Path(entries[0]["trash"]).with_name(f".{Path(entries[0]['trash']).name}.{gone}.part"),
            Path(entries[1]["src"]).with_name(f".{Path(entries[1]['src']).name}.{gone}.part")]
    ours = Path(entries[2]["src"]).with_name(f".{Path(entries[2]['src']).name}.{os.getpid()}.part")  # (running)
    for part in (*left, ours):
        part.write_bytes(b"half a copy")
    assert main(["undo", str(log)]) == 0
    assert not any(p.exists() for p in left) and ours.exists()
    assert outdir.runs_here(os.getpid()) and not outdir.runs_here(int(gone))


def test_undo_names_a_file_it_cannot_read_and_goes_on(run_dir, capsys, monkeypatch):
    """A file at a restore place this user cannot read: undo stopped with a traceback, the other
    files left in the trash. (A stand-in raises for the read: the tests may run as root.)"""
    from pipeline import actions
    log = run_dir / "undo.jsonl"
    assert main(["apply", str(run_dir / "plan.parquet"), "--action", "move", "--to", str(run_dir / "moved"),
                 "--execute", "--log", str(log)]) == 0
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    real = actions.sha256_file

    def reading(path):
        if str(path) == entries[0]["dst"]:
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(actions, "sha256_file", reading)
    capsys.readouterr()
    assert main(["undo", str(log)]) == 1
    err = capsys.readouterr().err
    assert "Permission denied" in err and entries[0]["path"] in err and "Traceback" not in err
    assert all(Path(e["src"]).exists() for e in entries[1:])


def test_an_old_undo_log_leaves_another_applys_file_alone(run_dir, capsys):
    """A deleted file put back by hand (the original, renamed back), then another file of its
    name in the trash (another apply's): undo took that file for its own interrupted copy and
    deleted it, exit 0. The original is in place, and the other file stays."""
    log = run_dir / "undo.jsonl"
    assert main(["apply", str(run_dir / "plan.parquet"), "--action", "delete", "--execute", "--log", str(log)]) == 0
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    for e in entries:
        os.rename(e["trash"], e["src"])
        Path(e["trash"]).write_bytes(b"another apply's file of that name")
    capsys.readouterr()
    assert main(["undo", str(log)]) == 0
    assert capsys.readouterr().out.count("another file now at") == len(entries)
    assert all(Path(e["trash"]).read_bytes() == b"another apply's file of that name" for e in entries)
    assert all(hashlib.sha256(Path(e["src"]).read_bytes()).hexdigest() == e["sha256"] for e in entries)


def test_a_trash_folder_that_is_a_link_is_refused_and_undo_never_walks_one(run_dir, capsys):
    """A trash folder made a link to elsewhere: apply put the files there, and undo removed
    every empty folder under the link's target."""
    elsewhere = run_dir / "elsewhere"
    (elsewhere / "empty" / "folder").mkdir(parents=True)
    (run_dir / "undo.trash").symlink_to(elsewhere)
    before = snapshot(run_dir / "data")
    assert main(["apply", str(run_dir / "plan.parquet"), "--action", "delete", "--execute",
                 "--log", str(run_dir / "undo.jsonl")]) == 2
    assert "is a symlink" in capsys.readouterr().err
    assert snapshot(run_dir / "data") == before and not (run_dir / "undo.jsonl").exists()
    (run_dir / "undo.jsonl").write_text("")  # (a log with no entry: undo still looks at its trash)
    assert main(["undo", str(run_dir / "undo.jsonl")]) == 0
    assert (elsewhere / "empty" / "folder").is_dir()


def test_a_name_with_control_characters_round_trips_a_csv_plan_and_is_shown_escaped(photo_paths, tmp_path, capsys):
    """A carriage return in a name was written unquoted to a CSV plan, which apply then read as
    two rows (a traceback); an escape sequence in a name was printed as it is, and could erase
    the dry run's lines before it on a terminal."""
    data = tmp_path / "data"
    data.mkdir()
    odd = "a\rwould delete: b.jpg\x1b[2K.jpg"
    for name in (odd, "b.jpg"):
        (data / name).write_bytes(photo_paths[0].read_bytes())
    assert main(["dedupe", str(data), "--out", str(tmp_path / "out"), "--tiers", "screen", "--scheduler", "sync",
                 "--quiet"]) == 0
    assert main(["plan", str(tmp_path / "out"), "--keep", "shortest_path", "--output", str(tmp_path / "plan.csv")]) == 0
    plan = read_plan(tmp_path / "plan.csv")
    assert sorted(plan["path"]) == sorted([odd, "b.jpg"])
    capsys.readouterr()
    assert main(["apply", str(tmp_path / "plan.csv"), "--action", "delete"]) == 0
    out = capsys.readouterr().out
    assert "would delete: a\\x0dwould delete: b.jpg\\x1b[2K.jpg" in out and "\x1b" not in out and "\r" not in out
    assert main(["apply", str(tmp_path / "plan.csv"), "--action", "delete", "--execute",
                 "--log", str(tmp_path / "undo.jsonl")]) == 0
    assert sorted(p.name for p in data.iterdir()) == ["b.jpg"]
    assert main(["undo", str(tmp_path / "undo.jsonl")]) == 0
    assert sorted(p.name for p in data.iterdir()) == sorted([odd, "b.jpg"])


def test_undo_never_restores_through_a_folder_made_a_link_since(run_dir, capsys):
    """A folder of DATA swapped for a link to another folder after apply: undo (as root) wrote
    the restored files into the link's target. They stay in the trash, named (exit 1)."""
    data = run_dir / "data"
    log = run_dir / "undo.jsonl"
    assert main(["apply", str(run_dir / "plan.parquet"), "--action", "delete", "--execute", "--log", str(log)]) == 0
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    assert {Path(e["src"]).parent.name for e in entries} == {"copies"}
    elsewhere = run_dir / "elsewhere"
    elsewhere.mkdir()
    (data / "copies").rename(run_dir / "copies-moved-away")
    (data / "copies").symlink_to(elsewhere)
    capsys.readouterr()
    assert main(["undo", str(log)]) == 1
    assert "its folder now leads to" in capsys.readouterr().err
    assert list(elsewhere.iterdir()) == [] and all(Path(e["trash"]).is_file() for e in entries)
    (data / "copies").unlink()  # the folder put back: undo goes through
    (run_dir / "copies-moved-away").rename(data / "copies")
    assert main(["undo", str(log)]) == 0 and not any(Path(e["trash"]).exists() for e in entries)


def test_a_move_or_trash_into_a_folder_the_scan_reaches_through_a_link_is_refused(run_dir, capsys):
    """DATA/linked -> outside: a move --to outside/moved was accepted, and the next run listed the
    moved files again under linked/moved."""
    outside = run_dir / "outside"
    outside.mkdir()
    (run_dir / "data" / "other" / "linked").symlink_to(outside)
    before = snapshot(run_dir / "data")
    for args in (["--action", "move", "--to", str(outside / "moved")],
                 ["--action", "delete", "--log", str(outside / "undo.jsonl")]):
        capsys.readouterr()
        assert main(["apply", str(run_dir / "plan.parquet"), *args, "--execute"]) == 2
        err = capsys.readouterr().err
        assert "reaches through its link" in err and "linked" in err, err
    assert snapshot(run_dir / "data") == before and not (outside / "moved").exists()
    # --to a folder that holds the link's target: copies/a_copy.jpg would land in it
    (run_dir / "data" / "other" / "linked").unlink()
    (outside / "copies").mkdir()
    (run_dir / "data" / "other" / "linked").symlink_to(outside / "copies")
    capsys.readouterr()
    assert main(["apply", str(run_dir / "plan.parquet"), "--action", "move", "--to", str(outside), "--execute"]) == 2
    assert "reaches through its link" in capsys.readouterr().err
    # a link the scan does not follow (a hidden name) blocks nothing
    (run_dir / "data" / "other" / "linked").unlink()
    (run_dir / "data" / "other" / ".hidden").symlink_to(outside)
    assert main(["apply", str(run_dir / "plan.parquet"), "--action", "move", "--to", str(outside / "moved")]) == 0
    assert snapshot(run_dir / "data") == before


def test_a_file_past_path_max_is_refused_saying_why(photo_paths, tmp_path, capsys):
    """The scan reads a file whose path is longer than PATH_MAX (folder by folder); apply refused
    it as "cannot be read (File name too long)", though the run had read it."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "top.jpg").write_bytes(photo_paths[0].read_bytes())
    fd = os.open(data, os.O_RDONLY)
    try:
        for _ in range(21):  # ~4.2 kB of path: made through fds, as no path that long can be opened
            os.mkdir("d" * 200, dir_fd=fd)
            nxt = os.open("d" * 200, os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = nxt
        out = os.open("bottom.jpg", os.O_WRONLY | os.O_CREAT, dir_fd=fd)
        os.write(out, photo_paths[0].read_bytes())
        os.close(out)
    finally:
        os.close(fd)
    assert main(["dedupe", str(data), "--out", str(tmp_path / "out"), "--tiers", "screen", "--scheduler", "sync",
                 "--quiet"]) == 0
    assert main(["plan", str(tmp_path / "out"), "--keep", "shortest_path", "--output", str(tmp_path / "plan.parquet")]) == 0
    capsys.readouterr()
    assert main(["apply", str(tmp_path / "plan.parquet"), "--action", "delete"]) == 1
    err = capsys.readouterr().err
    assert "longer than the system's limits (PATH_MAX, NAME_MAX)" in err and "by hand" in err, err[-500:]


def test_a_csv_plan_with_a_whole_second_mtime_applies(run_dir, capsys):
    """A file modified at a whole second (camera cards, zips) has no fraction in isoformat(): a
    format guessed from the first row refused the CSV plan (a traceback, then "not a time")."""
    from pipeline.actions import write_plan
    data = run_dir / "data"
    for path in (data / "copies" / "a_copy.jpg", data / "originals" / "b.jpg"):
        os.utime(path, (1714557600, 1714557600))  # 2024-05-01T10:00:00Z
    assert main(["dedupe", str(data), "--out", str(run_dir / "out"), "--tiers", "screen", "--scheduler", "sync",
                 "--quiet"]) == 0
    assert main(["plan", str(run_dir / "out"), "--keep", "preferred_folder", "--prefer", "originals",
                 "--output", str(run_dir / "plan.csv")]) == 0
    plan = read_plan(run_dir / "plan.csv")
    assert (plan["mtime"] == pd.Timestamp("2024-05-01T10:00:00Z")).sum() == 2
    capsys.readouterr()
    assert main(["apply", str(run_dir / "plan.csv"), "--action", "delete"]) == 0
    # a CSV written before the fix (no fraction on whole seconds), and one edited into a non-time
    write_plan(plan, run_dir / "old.csv")
    text = (run_dir / "old.csv").read_text().replace("T10:00:00.000000+00:00", "T10:00:00+00:00")
    (run_dir / "old.csv").write_text(text)
    assert read_plan(run_dir / "old.csv")["mtime"].tolist() == plan["mtime"].tolist()
    (run_dir / "bad.csv").write_text(text.replace("T10:00:00+00:00", "yesterday", 1))
    capsys.readouterr()
    assert main(["apply", str(run_dir / "bad.csv"), "--action", "delete"]) == 2
    err = capsys.readouterr().err.strip()
    assert "'2024-05-01yesterday'" in err and "ISO 8601" in err and len(err.splitlines()) == 1, err


def test_an_undo_log_written_before_it_recorded_folders_and_inodes_still_restores(run_dir, capsys):
    """Logs from before today's keys (each file's real folder, its device and inode): undo
    restores them as before."""
    data = run_dir / "data"
    before = snapshot(data)
    log = run_dir / "undo.jsonl"
    assert main(["apply", str(run_dir / "plan.parquet"), "--action", "delete", "--execute", "--log", str(log)]) == 0
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    assert all({"folder", "dev", "ino"} <= set(e) for e in entries)
    log.write_text("".join(json.dumps({k: v for k, v in e.items() if k not in ("folder", "dev", "ino")}) + "\n"
                           for e in entries))
    assert main(["undo", str(log)]) == 0
    assert snapshot(data) == before
