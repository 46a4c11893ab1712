"""Acting on a run's results, safely: plan -> apply (dry run first) -> undo.

`make_plan` turns a finished run into a keep/remove plan: one row per image in a cluster, the
keeper chosen by a policy (pipeline/results.py), with the size, modification time and sha256 the
run recorded. `apply_plan` carries out one action on the "remove" rows:

- move: to `--to DIR`, under the same relative path;
- hardlink / symlink: the file is replaced by a link to the cluster's keeper;
- delete: the file goes to a trash folder beside the undo log (so a delete can be undone).

Safety rules, checked per file just before acting (a refused file is reported and left alone;
the others go on):

- a file whose size, modification time or sha256 differ from the run's is refused (it was edited
  after the run: the decision may no longer hold);
- nothing is removed from a cluster unless its keeper exists and is unchanged (never the last
  copy), and a file that *is* the keeper under another name (same inode) is never removed;
- every action is written to the undo log (JSON lines, flushed to disk) before it is carried out;
  `undo` replays the log backwards and restores the tree byte for byte, and is safe to run again.

The pipeline itself never modifies input files; only `apply --execute` does.
"""
from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable, TextIO

import numpy as np
import pandas as pd

from pipeline import paths, scan
from pipeline.outdir import run_id_of, runs_here
from pipeline.results import Keep, Run

ACTIONS = ("move", "hardlink", "symlink", "delete")
# raw_path: the exact bytes of a name that is not valid UTF-8 (`path` is then its text form,
# pipeline/paths.py), null otherwise, as images.parquet's; hexadecimal in a CSV plan; a plan made
# before it existed is read without it and acts on `abs_path` as before
RAW_COLUMN = "raw_path"
PLAN_COLUMNS = ["cluster_id", "path", "abs_path", "action", "keeper", "keeper_abs_path", "bytes", "mtime",
                "sha256", "image_id", RAW_COLUMN]


_CSV_TEXT = ("path", "abs_path", "action", "keeper", "keeper_abs_path", "sha256", RAW_COLUMN)  # read as text


class PlanError(ValueError):
    """A plan or log that cannot be used as given (the CLI exits 2)."""


def make_plan(run: Run, keep: Keep = "largest_pixels", prefer: Iterable[str] = ()) -> pd.DataFrame:
    """The keep/remove plan of a run: PLAN_COLUMNS, clusters largest first, keeper first in each."""
    members = run.clusters(keep=keep, prefer=prefer)
    keeper = members[members["keeper"]].set_index("cluster_id")
    plan = pd.DataFrame({
        "cluster_id": members["cluster_id"].astype("int64").to_numpy(),
        "path": members["path"].to_numpy(), "abs_path": members["abs_path"].to_numpy(),
        "action": ["keep" if k else "remove" for k in members["keeper"]],
        "keeper": keeper["path"].reindex(members["cluster_id"]).to_numpy(),
        "keeper_abs_path": keeper["abs_path"].reindex(members["cluster_id"]).to_numpy(),
        "bytes": members["bytes"].astype("int64").to_numpy(),
        "mtime": pd.to_datetime(members["mtime"], utc=True).dt.floor("us").to_numpy(),
        "sha256": members["sha256"].to_numpy(), "image_id": members["image_id"].astype("int64").to_numpy(),
        RAW_COLUMN: pd.Series(members[RAW_COLUMN].to_numpy(dtype=object) if RAW_COLUMN in members
                              else [None] * len(members), dtype=object),
    })
    plan["mtime"] = pd.to_datetime(plan["mtime"], utc=True)
    order = plan.assign(_k=plan["action"] != "keep").reset_index(drop=True)
    order["_c"] = pd.factorize(order["cluster_id"])[0]  # keep the clusters' order (largest first)
    plan = order.sort_values(["_c", "_k", "path"], kind="stable").drop(columns=["_c", "_k"]).reset_index(drop=True)
    plan.attrs["run_id"] = run.manifest.get("run_id")  # (kept in a Parquet plan's metadata: `stale_plan`)
    from pipeline import storage
    if not storage.is_url(str(run.out_dir)):  # (and its OUT: `check_plan_against_run`)
        plan.attrs["out"] = os.path.abspath(str(run.out_dir))
    return plan


def stale_plan(plan: pd.DataFrame, path: str | Path) -> str | None:
    """Why the plan at `path` may be out of date, or None: a Parquet plan records its run, and a
    plan kept in OUT (the default OUT/plan.parquet) is compared with the run OUT holds now. Each
    file is still checked against the plan before anything is done; this says the clusters may
    have changed."""
    made_for, out = plan.attrs.get("run_id"), Path(path).parent
    now = run_id_of(out) if made_for else None
    if now and now != made_for:
        return (f"the plan was made for run {made_for}, and {out} now holds run {now}: its clusters "
                "may have changed since; make a new plan with `dedupe plan`")
    return None


def write_plan(plan: pd.DataFrame, path: str | Path) -> Path | str:
    """The plan as Parquet or CSV (by the name's suffix), written whole or not at all: a local file
    by rename, or an object on a store (a URL, e.g. OUT/plan.parquet of a run on S3), uploaded whole
    (a single or multipart PUT: readers see the old object or the new one)."""
    from pipeline import storage
    path = storage.local_form(path)
    if storage.is_url(path):
        name = path.rsplit("/", 1)[-1]
        if not name.endswith((".parquet", ".csv")) or name in (".parquet", ".csv"):
            raise PlanError(f"plan file {str(path)!r}: use a .parquet or .csv name")
        with tempfile.TemporaryDirectory(prefix="dedupe-plan-") as tmp:
            local = write_plan(plan, Path(tmp) / name)
            fs, key = storage.filesystem(str(path))
            fs.put_file(str(local), key)
        return str(path)
    path = Path(path)
    if path.suffix not in (".parquet", ".csv"):
        raise PlanError(f"plan file {str(path)!r}: use a .parquet or .csv name")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    if path.suffix == ".parquet":
        plan.to_parquet(tmp, index=False)
    else:
        hexed = {RAW_COLUMN: [bytes(r).hex() if isinstance(r, (bytes, bytearray)) else None
                              for r in plan[RAW_COLUMN]]} if RAW_COLUMN in plan else {}
        # (CRLF, as RFC 4180: a name holding a lone carriage return is then quoted; with "\n" it was
        # not, and a reader took it for the end of the row)
        plan.assign(mtime=plan["mtime"].map(lambda t: t.isoformat(timespec="microseconds")), **hexed).to_csv(tmp, index=False,
                                                                                      lineterminator="\r\n")
    os.replace(tmp, path)
    return path


def read_plan(path: str | Path) -> pd.DataFrame:
    from pipeline import storage
    path = storage.local_form(path)
    if storage.is_url(path):
        raise PlanError(f"plan file {str(path)!r} is on a store: `apply` works on local files only; copy the "
                        "plan down if its files are local, or act on the objects it lists with the store's tools")
    path = Path(path)
    if not path.is_file():
        raise PlanError(f"plan file {str(path)!r} not found: make one with `dedupe plan OUT --keep POLICY`")
    try:
        plan = pd.read_parquet(path) if path.suffix == ".parquet" else \
            pd.read_csv(path, dtype={c: str for c in _CSV_TEXT}, keep_default_na=False,  # (hex "99" is no
                        na_values={c: [""] for c in PLAN_COLUMNS if c not in _CSV_TEXT})
        # number, and a file named "NA", "null" or "nan" is no missing value: its row was refused)
    except Exception as exc:
        raise PlanError(f"plan file {str(path)!r} cannot be read: {exc}") from None
    missing = [c for c in PLAN_COLUMNS if c not in plan and c != RAW_COLUMN]
    if missing:
        raise PlanError(f"plan file {str(path)!r} lacks the columns {missing}: make it with `dedupe plan`")
    try:  # (ISO 8601 row by row: a whole second is written without its fraction, and a format
        # guessed from the first row refused the plan at the first such file)
        plan["mtime"] = pd.to_datetime(plan["mtime"], utc=True, format="ISO8601")
    except (ValueError, TypeError):
        bad = next((v for v in plan["mtime"] if not _is_time(v)), None)
        raise PlanError(f"plan file {str(path)!r}: its mtime column holds {bad!r}, which is not an ISO 8601 time; "
                        "put back the value `dedupe plan` wrote") from None
    if RAW_COLUMN not in plan:
        plan[RAW_COLUMN] = pd.Series(None, index=plan.index, dtype=object)
    else:  # (a CSV plan's are hexadecimal)
        try:
            plan[RAW_COLUMN] = pd.Series([bytes.fromhex(r) if isinstance(r, str) and r else None if isinstance(r, str) else
                                          bytes(r) if isinstance(r, (bytes, bytearray)) else None
                                          for r in plan[RAW_COLUMN]], index=plan.index, dtype=object)
        except ValueError:
            raise PlanError(f"plan file {str(path)!r}: column {RAW_COLUMN} holds a value that is not hexadecimal "
                            "bytes; make the plan again with `dedupe plan`") from None
    bad = set(plan["action"]) - {"keep", "remove"}
    if bad:
        raise PlanError(f"plan file {str(path)!r}: unknown action(s) {sorted(bad)} (keep or remove)")
    check_plan(plan, str(path))
    check_plan_against_run(plan, path)
    return plan


def _is_time(value) -> bool:
    try:
        pd.to_datetime(value, utc=True, format="ISO8601")
        return True
    except (ValueError, TypeError):
        return False


def check_plan_against_run(plan: pd.DataFrame, path: str | Path) -> None:
    """A Parquet plan records its run and OUT: while OUT holds that run, each row must be a file
    of it in the cluster the run put it in. An edited cluster_id merged two clusters under one
    keeper, and a row copied from images.parquet put a photo with no copy in a cluster, and each
    removed the only copy of a photo. (A CSV plan, or one whose OUT holds a later run,
    `stale_plan`, is checked against itself only: `check_plan`.)"""
    made_for, out = plan.attrs.get("run_id"), Path(plan.attrs.get("out") or Path(path).parent)
    if not made_for or run_id_of(out) != made_for:
        return
    try:
        run = pd.read_parquet(out / "images.parquet", columns=["image_id", "cluster_id"])
    except (OSError, ValueError):
        return
    # (as whole numbers: ids are 64-bit, more than a float tells apart)
    cluster_of = pd.Series(run["cluster_id"].astype("Int64").array, index=run["image_id"].astype("int64").to_numpy())
    theirs = cluster_of.reindex(pd.to_numeric(plan["image_id"], errors="coerce").astype("Int64").array).array
    ours = pd.to_numeric(plan["cluster_id"], errors="coerce").astype("Int64").array
    wrong = (theirs.isna() | (theirs != ours).fillna(True)).to_numpy(dtype=bool)
    if wrong.any():
        rows = plan[wrong]
        shown = ", ".join(repr(str(p)) for p in rows["path"].head(3))
        raise PlanError(f"plan file {str(path)!r}: rows that are not in the cluster run {made_for} put them in "
                        f"({shown}{', ...' if len(rows) > 3 else ''}): the plan may be edited only in its action "
                        "column (one keep row per cluster): make it again with `dedupe plan`")


def check_plan(plan: pd.DataFrame, name: str = "the plan") -> None:
    """Refuse a plan whose rows are not files of one run, each once (an edit may change which
    member of a cluster is kept, nothing else): a row without a cluster, a path listed twice (a
    cluster's keeper copied into another cluster as "remove" would have removed every copy), a
    path that is absolute or climbs out of the scanned folder with "..", a row whose abs_path is
    not the scanned folder's path joined with its path or whose image_id is not its path's."""
    from pathlib import PurePosixPath
    from pipeline.run import image_ids

    def refuse(why: str, rows: pd.DataFrame) -> None:
        shown = ", ".join(repr(str(p)) for p in rows["path"].head(3))
        raise PlanError(f"plan file {name!r}: {why} ({shown}{', ...' if len(rows) > 3 else ''}); the plan may be "
                        "edited only in its action column (one keep row per cluster): make it again with "
                        "`dedupe plan`")

    if plan["cluster_id"].isna().any():
        refuse("rows without a cluster_id", plan[plan["cluster_id"].isna()])
    for column in ("cluster_id", "image_id"):  # (64-bit ids: a float tells ids apart only to 53 bits)
        if pd.api.types.is_float_dtype(plan[column]):
            raise PlanError(f"plan file {name!r}: its {column} column holds floating-point numbers, which cannot "
                            "hold 64-bit ids exactly (a table tool's conversion?): make it again with `dedupe plan`")
    if any((plan[c].isna() | (plan[c].astype(object) == "")).any() for c in ("path", "abs_path")):
        raise PlanError(f"plan file {name!r}: rows without a path or abs_path; make it again with `dedupe plan`")
    # (as written, "./a.jpg" and "a.jpg" were two paths: the keeper could be removed as the other)
    twice = pd.Series([str(PurePosixPath(str(p))) for p in plan["path"]], index=plan.index).duplicated(keep=False)
    if twice.any():
        refuse("paths listed more than once", plan[twice])
    rel = [PurePosixPath(str(p)) for p in plan["path"]]
    climbing = [p.is_absolute() or ".." in p.parts or not p.parts for p in rel]
    if any(climbing):
        refuse("paths that are not inside the scanned folder", plan[climbing])
    raws = plan[RAW_COLUMN] if RAW_COLUMN in plan else pd.Series(None, index=plan.index, dtype=object)
    # (raw_path names the file acted on: one naming ../outside/x.jpg moved a file outside DATA)
    odd_raw = [isinstance(r, (bytes, bytearray)) and bytes(r).decode("utf-8", "backslashreplace") != str(p)
               for r, p in zip(raws, plan["path"])]
    if any(odd_raw):
        refuse(f"rows whose {RAW_COLUMN} is not the bytes of their path", plan[odd_raw])
    paths, abs_paths = plan["path"].astype(str).tolist(), plan["abs_path"].astype(str).tolist()
    roots = {a[:len(a) - len(p)] if a.endswith("/" + p) else None for a, p in zip(abs_paths, paths)}
    if None in roots or len(roots) > 1:
        odd = [not a.endswith("/" + p) or a[:len(a) - len(p)] != next(iter(roots - {None}), None)
               for a, p in zip(abs_paths, paths)]
        refuse("rows whose abs_path is not the scanned folder's path joined with their path", plan[odd])
    names = [bytes(r) if isinstance(r, (bytes, bytearray)) else str(p) for r, p in zip(raws, paths)]
    wrong = image_ids(names) != pd.to_numeric(plan["image_id"], errors="coerce").to_numpy()
    if wrong.any():
        refuse("rows whose image_id is not their path's", plan[wrong])


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _us(ts: pd.Timestamp) -> int:
    """Microseconds since the epoch (not through `ts.value`, nanoseconds, which end in 2262)."""
    return int(ts.to_datetime64().astype("datetime64[us]").astype(np.int64))


def changed(abs_path: str, row) -> str | None:
    """Why the file is not the one the run saw (None when it is): missing, size, mtime, sha256."""
    try:
        st = os.stat(abs_path)
    except FileNotFoundError:
        return "is missing"
    except OSError as exc:
        if exc.errno == errno.ENAMETOOLONG:  # (the scan reads such a file through its folders)
            return ("has a path or a name longer than the system's limits (PATH_MAX, NAME_MAX), which apply cannot "
                    "open: the scan reads it folder by folder; act on such files by hand")
        return f"cannot be read ({exc.strerror})"
    if st.st_size != int(row.bytes):
        return f"changed since the run: size {int(row.bytes)} -> {st.st_size} bytes"
    # the run stored the mtime floored to the microsecond, from st_mtime_ns, or from st_mtime (a
    # float) in older outputs and past 2262 (scan.MTIME_NS_MAX): allow that rounding, nothing more
    slack = 1 if scan.mtime_ns_exact(st.st_mtime_ns) else 4
    if abs(st.st_mtime_ns // 1000 - _us(row.mtime)) > slack:
        now = datetime.fromtimestamp(st.st_mtime, timezone.utc).isoformat(timespec="seconds")
        return f"changed since the run: modified {now} (run saw {row.mtime.isoformat(timespec='seconds')})"
    try:
        if sha256_file(abs_path) != row.sha256:
            return "changed since the run: content (sha256) differs"
    except OSError as exc:  # (unreadable: a traceback stopped the apply, files already acted on)
        return f"cannot be read ({exc.strerror})"
    return None


@dataclass
class Outcome:
    done: list[str] = field(default_factory=list)
    refused: list[tuple[str, str]] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.refused and not self.failed


class UndoLog:
    """JSON lines, one per action, each flushed to disk before the action runs."""

    def __init__(self, path: Path):
        self.path = path
        self.trash = path.with_name(path.stem + ".trash")
        self._f: TextIO | None = None  # opened on the first action: no empty logs

    def write(self, entry: dict) -> None:
        if self._f is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._f = open(self.path, "a", encoding="utf-8")
        entry = {"time": datetime.now(timezone.utc).isoformat(), **entry}
        self._f.write(json.dumps(entry) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        if self._f is not None:
            self._f.close()


def link_target(keeper: str, dest: str) -> str:
    """What a symlink at `dest` holds to reach `keeper`: a path relative to dest's folder, so the
    link survives moving the whole tree, made from the real paths of both (a folder reached
    through a link: a path relative to the link's name would point beside the real folder)."""
    return os.path.relpath(os.path.realpath(keeper), os.path.realpath(os.path.dirname(dest)))


def _link(op: str, keeper: str, dest: str) -> None:
    if op == "hardlink":
        os.link(keeper, dest)
        return
    os.symlink(link_target(keeper, dest), dest)
    if not (os.path.exists(dest) and os.path.samefile(dest, keeper)):  # (never leave a dangling link)
        os.unlink(dest)
        raise OSError(f"a symlink at {dest} would not reach the keeper {keeper}")


def file_name(row) -> str:
    """The row's file as the operating system names it (`paths.os_name`: the scanned folder's
    path, itself perhaps not UTF-8, and the row's path, or for a name that is not UTF-8 its exact
    bytes, RAW_COLUMN). Without them, such a file's text form names no file and `apply` refused
    its cluster ("the keeper ... is missing")."""
    from pipeline import paths
    return paths.os_name(str(row.abs_path), str(row.path), getattr(row, RAW_COLUMN, None))


def _relative_name(row) -> str:
    """The row's path under the scanned folder, as the operating system names it."""
    raw = getattr(row, RAW_COLUMN, None)
    return os.fsdecode(bytes(raw)) if isinstance(raw, (bytes, bytearray)) else str(row.path)


def _identity(path: str) -> dict:
    """The file's device and inode, in the log: `undo` tells the original left in place by an
    interrupted copy from a copy of it put back since (same bytes, another file)."""
    st = os.stat(path, follow_symlinks=False)
    return {"dev": st.st_dev, "ino": st.st_ino}


def _is_logged_original(e: dict, path: str) -> bool:
    """Is `path` the very file `apply` logged in `e`? By device and inode where the log has them
    (a log from before they were written: by the sha256 alone)."""
    if not os.path.isfile(path) or os.path.islink(path) or not e.get("sha256"):
        return False
    if "ino" in e:
        st = os.stat(path)
        return (st.st_dev, st.st_ino) == (e["dev"], e["ino"])
    return sha256_file(path) == e["sha256"]


def _remove_stale_parts(dst: str | Path) -> None:
    """A copy to another file system that a kill stopped leaves `.<name>.<pid>.part` beside its
    destination (`move_file`): removed, unless its process still runs."""
    dst = Path(dst)
    with contextlib.suppress(OSError):
        for part in dst.parent.glob(f".{glob.escape(dst.name)}.*.part"):
            pid = part.name[len(dst.name) + 2:-len(".part")]
            if pid.isdigit() and not runs_here(int(pid)):
                part.unlink()


def move_file(src: str | Path, dst: str | Path) -> None:
    """Move one file to `dst` (not there yet); when it fails, nothing is left at `dst` and `src` is
    where it was. shutil.move copies whenever the rename fails, for any reason (a source folder
    that cannot be written: EACCES), and kept its copy when the source could then not be
    removed, or left a cut one on a full disk: every later try found its destination taken."""
    try:
        os.rename(src, dst)
        return
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
    part = Path(dst).with_name(f".{Path(dst).name}.{os.getpid()}.part")  # (another file system)
    try:
        shutil.copy2(src, part, follow_symlinks=False)
        os.rename(part, dst)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(part)
        raise
    try:
        os.unlink(src)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(dst)
        raise


def _act(op: str, row, src: str, keeper: str, to: Path | None, log: UndoLog) -> None:
    """`op` on the file `src` (file_name) of a remove row, `keeper` its cluster's keeper's file.
    The log's paths are the operating system's names (JSON escapes a name's undecodable bytes)."""
    if op == "move":
        dst = to / _relative_name(row)
        if os.path.lexists(dst):
            raise FileExistsError(f"destination {dst} exists")
        dst.parent.mkdir(parents=True, exist_ok=True)
        log.write({"op": "move", "path": row.path, "src": src, "dst": str(dst), "sha256": row.sha256, **_identity(src),
                   "folder": _real_folder(src)})
        move_file(src, dst)
        return
    trash = log.trash / _relative_name(row)
    if os.path.lexists(trash):
        raise FileExistsError(f"trash entry {trash} exists")
    trash.parent.mkdir(parents=True, exist_ok=True)
    link = {"link": link_target(keeper, src)} if op == "symlink" else {}  # (undo removes only this link)
    log.write({"op": op, "path": row.path, "src": src, "trash": str(trash), "keeper": keeper,
               "sha256": row.sha256, **_identity(src), **link, "folder": _real_folder(src)})
    move_file(src, trash)
    if op == "delete":
        return
    try:
        _link(op, keeper, src)
    except OSError:
        move_file(trash, src)  # e.g. a hard link across file systems: put the file back
        raise


def apply_plan(plan: pd.DataFrame, action: str, to: str | Path | None = None, execute: bool = False,
               log_path: str | Path | None = None, echo: Callable[[str], None] = print,
               warn: Callable[[str], None] = lambda m: print(m, file=sys.stderr)) -> Outcome:
    """Carry out `action` on the plan's "remove" rows (only with execute=True; else print what
    would happen, after the same checks). Returns what was done, refused and failed."""
    if action not in ACTIONS:
        raise PlanError(f"unknown action {action!r}: use one of {', '.join(ACTIONS)}")
    if (action == "move") != (to is not None):
        raise PlanError("--to DIR is needed with --action move (and only with it)")
    from pipeline import paths, storage
    on_store = [p for p in plan["abs_path"] if storage.is_url(p)][:1]
    if on_store:
        raise PlanError(f"the plan's files are objects on a store ({on_store[0]}, ...): `apply` moves, links and "
                        "deletes local files only; act on the objects the plan lists with the store's tools")
    to = Path(to).resolve() if to is not None else None
    # (an absolute log: its trash and move targets are written into it, read by `undo` from anywhere)
    log_path = Path(os.path.abspath(log_path)) if log_path is not None else None
    # (each apply writes a log of its own: the log was appended to whatever file --log named, a
    # photo too, and `undo` then refused that file as "not JSON")
    if log_path is not None and os.path.lexists(log_path):
        raise PlanError(f"the undo log {str(log_path)!r} exists: each apply writes a log of its own; "
                        "give a new file name, or leave --log out (undo-<time>.jsonl beside the plan)")
    trash_folder = UndoLog(log_path).trash if log_path is not None and action != "move" else None
    if trash_folder is not None and trash_folder.is_symlink():
        raise PlanError(f"the trash folder {str(trash_folder)!r} (beside the undo log) is a symlink: apply and undo "
                        "would work in the folder it points at; remove the link, or pass --log with another name")
    trash = trash_folder.resolve() if trash_folder is not None else None
    # where each moved file would land (the checks below: never where the next run scans)
    moved = [(str(r.path), to / _relative_name(r)) for r in plan[plan["action"] == "remove"].itertuples()] \
        if to is not None else []
    for row in plan.head(1).itertuples():  # the scanned folder: abs_path is DATA/path
        abs_path, rel = str(row.abs_path), str(row.path)
        root = Path(paths.os_folder(abs_path[:-len(rel)]) or "/").resolve() if abs_path.endswith(rel) else None
        if root is None:
            continue
        if to is not None and to.is_relative_to(root):
            raise PlanError(f"--to {str(to)!r} is inside the scanned folder {abs_path[:-len(rel)]!r}: the next run "
                            "would find the moved files there again; choose a folder outside it")
        # (--to DATA's parent, DATA holding a folder of its own name: DATA/data/y.jpg went to DATA/y.jpg)
        inside = [path for path, dest in moved if dest.is_relative_to(root)]
        if inside:
            raise PlanError(f"--to {str(to)!r} holds the scanned folder, and moving {inside[0]!r} there would put "
                            "it back inside that folder (the next run would find it again); choose a folder "
                            "outside it")
        if trash is not None and trash.is_relative_to(root):
            raise PlanError(f"the trash folder {str(trash)!r} (beside the undo log) is inside the scanned folder "
                            f"{abs_path[:-len(rel)]!r}: the next run would find the files there again; pass "
                            "--log with a path outside it, or keep the plan outside it")
        # (the scan follows folder links once: a folder reached through one is scanned too)
        for link, real in _linked_folders(root, *_scan_rules(plan)) if to is not None or trash is not None else []:
            for where, what, lands in ((to, "--to", [dest for _, dest in moved]),
                                       (trash, "the trash folder (beside the undo log)", [])):
                if where is not None and (where.is_relative_to(real) or any(d.is_relative_to(real) for d in lands)):
                    raise PlanError(f"{what} {str(where)!r} would put files inside {str(real)!r}, which the scanned "
                                    f"folder reaches through its link {link!r}: the next run would find them there "
                                    "again; choose a folder outside it")
    verb = {"move": "move", "hardlink": "hard-link", "symlink": "symlink", "delete": "delete"}[action]
    out = Outcome()
    log = UndoLog(log_path) if execute else None
    full = False
    if not execute:
        for where, what in ((to, "--to"), (log_path.parent if log_path is not None else None, "the undo log's folder")):
            blocked = _cannot_write(where) if where is not None else None
            if blocked:
                warn(f"warning: {what} {str(where)!r}: {blocked}; --execute would fail")
    try:
        for _, group in plan.groupby("cluster_id", sort=False):
            if full:
                out.failed.append(("(the rest of the plan)", "stopped: no space left on the device"))
                break
            keepers = group[group["action"] == "keep"]
            removals = group[group["action"] == "remove"]
            if len(keepers) != 1:
                for r in removals.itertuples():
                    out.refused.append((r.path, f"its cluster has {len(keepers)} keepers in the plan (needs one)"))
                continue
            keeper = next(keepers.itertuples())
            keeper_file = file_name(keeper)
            why = changed(keeper_file, keeper)
            for r in removals.itertuples():
                if why is None:  # re-check cheaply per file: an earlier step may have touched it
                    why_now = None if os.path.exists(keeper_file) else "is missing"
                else:
                    why_now = why
                if why_now is not None:
                    out.refused.append((r.path, f"the keeper {keeper.path} {why_now}: nothing removed from this cluster"))
                    continue
                src = file_name(r)
                reason = changed(src, r)
                try:
                    if reason is None and os.path.samefile(src, keeper_file):
                        reason = "is the keeper's own file under another name (same inode)"
                except OSError as exc:  # (gone meanwhile: another apply running at the same time)
                    reason = f"cannot be looked at ({exc.strerror})"
                if reason is not None:
                    out.refused.append((r.path, reason))
                    continue
                target = f" -> {to / r.path}" if action == "move" else (
                    f" -> {keeper.path}" if action in ("hardlink", "symlink") else "")
                if not execute:
                    blocked = _cannot_remove(src)
                    if blocked:
                        out.failed.append((r.path, f"would fail: {blocked}"))
                        continue
                    echo(f"would {verb}: {paths.shown(r.path)}{paths.shown(target)}")
                    out.done.append(r.path)
                    continue
                try:
                    _act(action, r, src, keeper_file, to, log)
                except OSError as exc:
                    out.failed.append((r.path, str(exc)))
                    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                        full = True  # (every later file would fail the same way, each leaving work)
                        break
                    continue
                echo(f"{verb}: {paths.shown(r.path)}{paths.shown(target)}")
                out.done.append(r.path)
    finally:
        if log is not None:
            log.close()
    for path, reason in out.refused:
        warn(f"refused: {paths.shown(path)}: {paths.shown(reason)}; not touched")
    for path, reason in out.failed:
        warn(f"failed: {paths.shown(path)}: {paths.shown(reason)}")
    return out


def _cannot_remove(path: str) -> str | None:
    """Why `path` cannot be moved out of its folder (the folder must be writable), or None."""
    folder = os.path.dirname(path) or "."
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"its folder {folder} cannot be written (removing a file from a folder needs that)"
    return None


def _cannot_write(folder: Path) -> str | None:
    """Why files cannot be made in `folder` (or, when it does not exist yet, its nearest existing
    parent), or None."""
    at = Path(folder)
    while not at.exists() and at != at.parent:
        at = at.parent
    if not at.is_dir():
        return f"{at} is not a folder"
    if not os.access(at, os.W_OK | os.X_OK):
        return f"{at} cannot be written"
    return None


def _scan_rules(plan: pd.DataFrame) -> tuple[bool, bool]:
    """(skip_hidden, follow_symlinks) of the run the plan was made from (its run.json, for a Parquet
    plan whose OUT still holds it), else the defaults."""
    from pipeline.config import ScanConfig
    rules = {"skip_hidden": ScanConfig.skip_hidden, "follow_symlinks": ScanConfig.follow_symlinks}
    if plan.attrs.get("out") and plan.attrs.get("run_id"):
        with contextlib.suppress(OSError, ValueError, AttributeError, TypeError, KeyError):
            manifest = json.loads((Path(plan.attrs["out"]) / "run.json").read_text(encoding="utf-8"))
            if manifest.get("run_id") == plan.attrs["run_id"]:
                rules.update({k: bool(v) for k, v in manifest["config"]["scan"].items() if k in rules})
    return rules["skip_hidden"], rules["follow_symlinks"]


def _linked_folders(root: Path, skip_hidden: bool = True, follow_symlinks: bool = True) -> list[tuple[str, Path]]:
    """(link, its real folder) for each folder link the scan of `root` follows: a walk of its
    folders by the scan's rules (hidden names, links followed or not, folders holding another
    run's output or catalog not entered; each real folder once)."""
    from pipeline import catalog, outdir
    if not follow_symlinks:
        return []
    found, seen, stack = [], set(), [str(root)]
    while stack:
        folder = stack.pop()
        real = os.path.realpath(folder)
        if real in seen:
            continue
        seen.add(real)
        if folder != str(root) and any(os.path.lexists(os.path.join(folder, m))
                                       for m in (outdir.LOCK_NAME, catalog.LOCK_NAME)):
            continue
        with contextlib.suppress(OSError), os.scandir(folder) as it:
            for entry in it:
                if skip_hidden and entry.name.startswith("."):
                    continue
                with contextlib.suppress(OSError):
                    if entry.is_dir(follow_symlinks=True):
                        if entry.is_symlink():
                            found.append((entry.path, Path(os.path.realpath(entry.path))))
                        stack.append(entry.path)
    return found


def _real_folder(path: str) -> str:
    """The real path of `path`'s folder, or for a folder not there (to be made again) its nearest
    existing parent's real path joined with the rest."""
    folder, rest = os.path.dirname(path), []
    while not os.path.lexists(folder) and folder != os.path.dirname(folder):
        rest.append(os.path.basename(folder))
        folder = os.path.dirname(folder)
    return os.path.join(os.path.realpath(folder), *reversed(rest))


def default_log_path(plan_path: str | Path) -> Path:
    """undo-<UTC time to the microsecond>.jsonl beside the plan (to the second, two applies
    started together wrote one log, and one `undo` restored both)."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%f")
    return Path(plan_path).resolve().parent / f"undo-{stamp}.jsonl"


def _made_by_apply(entry: dict, path: str) -> bool:
    """Is `path` the link that `apply` put in place of the original?"""
    if entry["op"] == "symlink":  # (a log from before "link" was written: any link)
        return os.path.islink(path) and os.readlink(path) == entry.get("link", os.readlink(path))
    if entry["op"] == "hardlink":
        return os.path.exists(entry["keeper"]) and os.path.samefile(path, entry["keeper"])
    return False


def _is_copy_of(copy: str, original: str, sha256: str) -> bool:
    """Is `copy` a copy of `original` (whose sha256 the log has), whole or cut short?"""
    if not os.path.isfile(copy) or os.path.islink(copy):
        return False
    size, whole = os.path.getsize(copy), os.path.getsize(original)
    if size >= whole:
        return size == whole and sha256_file(copy) == sha256
    with open(copy, "rb") as a, open(original, "rb") as b:  # (a prefix of it: a copy stopped midway)
        while size > 0:
            chunk = a.read(min(size, 1 << 20))
            if not chunk or chunk != b.read(len(chunk)):
                return False
            size -= len(chunk)
    return True


def _undo_one(e: dict, out: Outcome, echo: Callable[[str], None]) -> None:
    """Put back the original of one log entry (see `undo`)."""
    src = e["src"]
    held = e["dst"] if e["op"] == "move" else e["trash"]  # where the original is now
    _remove_stale_parts(held)  # (an apply stopped while it copied there)
    if not os.path.lexists(held):
        if os.path.lexists(src) and not _made_by_apply(e, src):
            return  # the original is in place: never carried out, or already undone
        out.failed.append((e["path"], f"the original is neither at {held} nor at {src}"))
        return
    if not _made_by_apply(e, src) and _is_logged_original(e, src):
        # the original never left: a move to another file system (a copy, then the removal of
        # the original) was stopped before it ended; what it copied is apply's own, not a file,
        # if it holds the original's bytes (another apply may have put another file of that
        # name there since: an old log deleted it)
        if _is_copy_of(held, src, e["sha256"]):
            os.unlink(held)
            echo(f"in place (its interrupted copy at {paths.shown(held)} removed): {paths.shown(e['path'])}")
        else:
            echo(f"in place (another file now at {paths.shown(held)}, left alone): {paths.shown(e['path'])}")
        return
    if e.get("sha256") and os.path.isfile(held) and not os.path.islink(held) \
            and sha256_file(held) != e["sha256"]:  # (byte for byte, or not at all)
        out.failed.append((e["path"], f"{held} was changed since `apply` put it there (sha256 differs): "
                                      "left there"))
        return
    # the folder the run scanned, from the entry's path under it: not made again when it is gone
    # (an unmounted share: the files went into a new folder where the mount point was)
    root = src[:-len(e["path"])] if src.endswith("/" + e["path"]) else None
    if root is not None and not os.path.isdir(root):
        out.failed.append((e["path"], f"the scanned folder {root} is not there (not mounted?): left in {held}"))
        return
    # (a folder of the path made a link since: the file went where the link points)
    if "folder" in e and _real_folder(src) != e["folder"]:
        out.failed.append((e["path"], f"its folder now leads to {_real_folder(src)}, not {e['folder']} as when "
                                      f"`apply` ran (a link made or changed since): left in {held}"))
        return
    if os.path.lexists(src):
        if not _made_by_apply(e, src):
            what = "not the link `apply` made" if e["op"] in ("hardlink", "symlink") else "another file"
            out.failed.append((e["path"], f"{src} exists and is {what}: left alone"))
            return
        os.unlink(src)
    Path(src).parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_parts(src)  # (an undo stopped while it copied back)
    try:
        move_file(held, src)
    except OSError as exc:
        out.failed.append((e["path"], f"cannot put it back from {held}: {exc}"))
        return
    echo(f"restored: {paths.shown(e['path'])}")
    out.done.append(e["path"])


def undo(log_path: str | Path, echo: Callable[[str], None] = print,
         warn: Callable[[str], None] = lambda m: print(m, file=sys.stderr)) -> Outcome:
    """Replay an undo log backwards. Entries already undone (or never carried out) are skipped,
    so running it twice is harmless; a path someone changed since `apply` is left alone."""
    log_path = Path(log_path)
    if not log_path.is_file():
        raise PlanError(f"undo log {str(log_path)!r} not found")
    entries = []
    lines = log_path.read_text(encoding="utf-8", errors="replace").splitlines()
    for n, line in enumerate(lines, 1):
        if line.strip():
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError:
                if n == len(lines):  # a last line cut short (the machine stopped as it was written): its
                    warn(f"undo log {str(log_path)!r}, line {n}: cut short; its action was never started")
                    continue  # action, written after the whole line reached the disk, never began
                raise PlanError(f"undo log {str(log_path)!r}, line {n}: not JSON") from None
    out = Outcome()
    for e in reversed(entries):
        try:
            _undo_one(e, out, echo)
        except OSError as exc:  # (a file that cannot be read or removed: named, the others go on)
            out.failed.append((e["path"], f"cannot be restored: {exc}"))
    trash = log_path.with_name(log_path.stem + ".trash")
    # drop the emptied trash folders (a file left there means a failure above); never through a
    # link (made a link since: every empty folder under its target went)
    if trash.is_dir() and not trash.is_symlink():
        for folder, dirs, files in os.walk(trash, topdown=False):
            if not os.listdir(folder):
                os.rmdir(folder)
    for path, reason in out.failed:
        warn(f"not restored: {paths.shown(path)}: {paths.shown(reason)}")
    return out
