"""Command line: `dedupe dedupe DATA --out OUT [...]` (also `python -m pipeline dedupe ...`), and
`dedupe plan|apply|undo` to act on the results, `dedupe report` to rebuild the report.

Exit codes: 0 the run completed (unreadable files are recorded in the output, not fatal);
2 usage or configuration error, with a message saying what to fix; 1 the run failed or was
stopped (SIGTERM, SIGINT): its temporary files are removed and the previous outputs are untouched.
"""
from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

from pipeline.config import KEEP_POLICIES, ConfigError, load_config, preset_names
from pipeline.progress import STOP, NoWorkers, Stopped

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
STORE_CONFIG_HELP = ("YAML config file (e.g. the nightly run's) whose storage.options open OUT on a store: "
                     "endpoint, profile, credentials; its other sections are checked, not used")

DEDUPE_EPILOG = """\
examples:
  {prog} dedupe photos/ --out out                       the full cascade, default settings
  {prog} dedupe photos/ --out out --preset high-recall  also heavy crops and edits (embeds every image)
  {prog} dedupe photos/ --out out --preset fast         hashes + ORB only, no TensorFlow
  {prog} dedupe photos/ --out out --set screen.max_distance=12 --set decide.cosine_threshold=0.8
  {prog} dedupe photos/ --out out --scheduler tcp://10.0.0.5:8786   on an existing Dask cluster
  {prog} dedupe s3://bucket/photos --out s3://bucket/dedupe --scheduler tcp://10.0.0.5:8786
                                                        images, outputs and catalog in object storage
  {prog} dedupe photos/ --out out                       again: incremental (OUT/catalog)

presets (--preset): {presets}; YAML files (default lists every key, the others only what they
  change); --config FILE and --set KEY=VALUE apply on top, in that order.

outputs (in OUT):
  pairs.parquet   one row per candidate pair: paths, image ids, the evidence of each tier
                  (hash_distance, orb_*, cosine, and ssim/hist_corr for flat pairs), stage,
                  is_duplicate, reason and rule code
  images.parquet  one row per file seen: id, path, size, mtime, dimensions, format, sha256,
                  hash, error (null when fine), cluster_id (null when unique), raw_path (the
                  name's bytes when it is not UTF-8)
  run.json        config, versions, weights, counts, timings and catalog reuse per stage, and
                  the sha256 of the files above
  report/         the review page (report/index.html; report.html links to it): the largest
                  clusters (report.max_clusters), each pair side by side with its evidence, the
                  closest rejected pairs, errors
  (these names link into .dedupe/gen-<run id>/, switched as one unit when a run succeeds)
  catalog/        what the next run into this OUT reuses: it reads only new or changed files and
                  scores only new pairs (--catalog DIR|URL elsewhere, --no-catalog for none); also
                  what `{prog} query IMAGE --catalog OUT/catalog` looks images up in

after a run:
  {prog} plan OUT --keep largest_pixels     a keep/remove plan per cluster (OUT/plan.parquet)
  {prog} apply OUT/plan.parquet --action move --to /trash [--execute]   dry run unless --execute
  {prog} undo UNDO_LOG                        put back what apply changed

exit codes:
  0  the run completed (unreadable files are rows with an error, not failures)
  2  usage or configuration error (missing folder, bad YAML, unknown key, missing model weights,
     unreachable scheduler, OUT that cannot be written, OUT or catalog in use by another run;
     on object storage: unknown scheme or backend, refused storage.options, bad credentials,
     missing bucket, empty prefix), with a message saying what to fix
  1  the run failed or was stopped by SIGTERM/SIGINT: temporary files are removed and the
     previous outputs, if any, are untouched
"""


PLAN_EPILOG = """\
examples:
  {prog} plan out --keep largest_pixels                  out/plan.parquet: one row per clustered image
  {prog} plan out --keep preferred_folder --prefer originals --output plan.csv

Nothing is changed by `plan`: it writes which member of each cluster to keep and which to
remove; edit the action column if you like, then `{prog} apply`.

exit codes: 0 written; 2 usage error (no finished run in OUT, --keep preferred_folder without
  --prefer, an --output that cannot be written)
"""

APPLY_EPILOG = """\
examples:
  {prog} apply out/plan.parquet --action move --to /backup/dupes       a dry run: what would be done
  {prog} apply out/plan.parquet --action move --to /backup/dupes --execute
  {prog} apply out/plan.parquet --action delete --execute    into a trash folder beside the undo log
  {prog} undo out/undo-<time>.jsonl                          put everything back

Actions on each "remove" row: move (to --to, keeping its path under DATA), delete (moved to a
trash folder beside the undo log, never unlinked: `undo` restores it), hardlink or symlink (the
file is replaced by a link to its cluster's keeper). Every action is written to the undo log
before it is done. A file changed since the run (size, mtime or sha256) is refused, and nothing
is removed from a cluster whose keeper is missing or changed.

exit codes: 0 everything done (or would be); 1 some file refused or failed (each listed on
  stderr, the others done); 2 usage error (no plan, --action move without --to, --to inside DATA)
"""

UNDO_EPILOG = """\
Moves every file an `apply --execute` moved, deleted (into its trash) or replaced by a link back
to where it was, byte for byte, newest action first; a file changed since `apply` put it aside
is left there and named. Running it twice does no harm.

exit codes: 0 everything restored; 1 something could not be restored (named on stderr);
  2 usage error (no such log)
"""

REPORT_EPILOG = """\
examples:
  {prog} report out                                 rebuild out/report/ from out's files
  {prog} report out --set report.keep=oldest        with another keeper policy shown

exit codes: 0 rebuilt; 2 usage error (no finished run in OUT, OUT in use by a run or not
  writable, a bad --set); 1 failure
"""

QUERY_EPILOG = """\
examples:
  {prog} query new.jpg --catalog out/catalog                 a table on the terminal
  {prog} query a.jpg b.png --catalog out/catalog --output hits.csv
  {prog} query photos/new.jpg --catalog out/catalog --add    also record it in the catalog
  {prog} query new.jpg --catalog s3://bucket/out/catalog     a catalog in object storage (no --add)

output columns: query, path (catalog image, relative to its folder), image_id, hash_distance,
  orb_matches, orb_inliers, orb_score, cosine, stage, is_duplicate, reason, rule (as in
  pairs.parquet), query_error (why a query image could not be used); a query image compared
  with nothing has one row with no path, is_duplicate false and the reason "no candidate: ..."

exit codes: 0 done; 2 usage error (no catalog, missing image, bad --output extension, catalog in
  use with --add); 1 failure
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse exits 2 on usage errors already; keep its message
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")



def _counted(n: int, noun: str) -> str:
    """'1 cluster', '2 clusters'."""
    return f"{n} {noun}{'' if n == 1 else 's'}"

def _stop(signum, frame):
    """SIGTERM and SIGINT during a run: unwind it (`Stopped`), exit 1. A second signal must not
    interrupt the clean-up, and one that comes once the outputs are published must not fail a run
    that has succeeded (`STOP.published`); both are ignored. The signal is remembered in `STOP`, so
    that a raise lost in a callback is raised again (`progress.raise_if_stopped`)."""
    if STOP.published or STOP.signum is not None:
        return
    STOP.signum = signum
    if not STOP.holding:  # (at the commit point: noted, acted on by `progress.commit_point`)
        raise Stopped(signum)


def prog_name() -> str:
    """How the user invoked us, for examples and messages."""
    if os.environ.get("DEDUPE_PROG"):
        return os.environ["DEDUPE_PROG"]
    return "python -m pipeline" if os.path.basename(sys.argv[0] or "") == "__main__.py" else "dedupe"


def build_parser(prog: str = "dedupe") -> argparse.ArgumentParser:
    parser = _Parser(prog=prog, description="Find duplicate and near-duplicate images in a folder tree.",
                     epilog=f"run `{prog} dedupe --help` for examples, outputs and exit codes",
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    run = sub.add_parser("dedupe", help="run the cascade on a folder and write Parquet + report",
                         description="Run the duplicate-detection cascade (screen -> verify -> confirm) "
                                     "on a folder tree and write the results to OUT.",
                         epilog=DEDUPE_EPILOG.format(prog=prog, presets=", ".join(preset_names())),
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("data", help="folder of images (scanned recursively), or a URL such as s3://bucket/prefix")
    run.add_argument("--out", default="out", help="output folder or URL (default: out)")
    run.add_argument("--preset", default=None, choices=preset_names(),
                     help="named settings: fast, default, high-recall or strict (see below)")
    run.add_argument("--config", default=None, action="append",
                     help="YAML config file (keys as in the default preset)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config key, e.g. --set screen.max_distance=12 (repeatable)")
    run.add_argument("--tiers", choices=["screen", "verify", "confirm"], default=None,
                     help="last tier to run (same as --set tiers=...)")
    run.add_argument("--scheduler", default=None,
                     help="'auto' (default: in-process for small work, else a local cluster), 'local', "
                          "'sync' (in-process, one thread, for debugging) or a Dask scheduler "
                          "address such as tcp://127.0.0.1:8786 (DASK_SCHEDULER_ADDRESS works too)")
    run.add_argument("--catalog", default=None, metavar="DIR|URL",
                     help="catalog folder or store URL kept between runs (default: OUT/catalog; same as "
                          "--set catalog=DIR)")
    run.add_argument("--no-catalog", action="store_true",
                     help="run from scratch without a catalog (same as --set catalog=none)")
    run.add_argument("--rehash", action="store_true",
                     help="read every file and compare its sha256 with the catalog, instead of trusting "
                          "an unchanged size and modification time")
    run.add_argument("--quiet", action="store_true", help="no progress bars or heartbeat lines")
    run.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])

    query = sub.add_parser("query", help="which catalog images does each image duplicate?",
                           description="Compare images with a catalog built by `dedupe` (OUT/catalog by "
                                       "default): the same tiers and decision rule as the batch job.",
                           epilog=QUERY_EPILOG.format(prog=prog),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    query.add_argument("images", nargs="+", metavar="IMAGE", help="image file(s) to look up")
    query.add_argument("--catalog", required=True, metavar="DIR|URL",
                       help="the catalog folder or store URL (e.g. OUT/catalog, s3://bucket/out/catalog)")
    query.add_argument("--output", default=None, metavar="FILE",
                       help="write the rows to FILE (.parquet, .csv or .json) instead of a table on the terminal")
    query.add_argument("--add", action="store_true",
                       help="also add the images (which must lie inside the catalog's folder) to the catalog")
    query.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a setting of the catalog's config (its screen hashing settings "
                            "must stay), e.g. --set decide.cosine_threshold=0.8")
    query.add_argument("--config", default=None, metavar="FILE",
                       help="YAML config file whose storage.options open a catalog on a store (the "
                            "catalog's own settings apply otherwise; its other sections are checked, not used)")
    query.add_argument("--scheduler", default="sync",
                       help="'sync' (default: in-process, quickest for a few images), 'local' or an address")
    query.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])

    weights = sub.add_parser("weights", help="seed the Keras weights cache from a local folder")
    weights.add_argument("--from", dest="from_dir", required=True, help="folder holding the .h5 weight files")

    plan = sub.add_parser("plan", help="write a keep/remove plan for a finished run's clusters",
                          description="Write a plan: for each cluster of a finished run, which file to "
                                      "keep and which to remove (nothing is changed).",
                          epilog=PLAN_EPILOG.format(prog=prog), formatter_class=argparse.RawDescriptionHelpFormatter)
    plan.add_argument("out", help="output folder of a finished run, or its URL on a store (s3://bucket/out: the "
                                  "plan is written there unless --output says otherwise)")
    plan.add_argument("--keep", required=True, choices=KEEP_POLICIES, help="which member of each cluster to keep")
    plan.add_argument("--prefer", action="append", default=[], metavar="DIR",
                      help="with --keep preferred_folder: a folder (relative to DATA, or absolute) whose files "
                           "are kept first (repeatable, best first)")
    plan.add_argument("--output", default=None, help="plan file, .parquet or .csv (default: OUT/plan.parquet)")
    plan.add_argument("--config", default=None, metavar="FILE", help=STORE_CONFIG_HELP)
    plan.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="a storage option for OUT on a store, e.g. --set "
                           "'storage.options={endpoint_url: http://minio:9000}' (repeatable)")

    apply = sub.add_parser("apply", help="carry out a plan on the files (a dry run unless --execute)",
                           description="Carry out a plan's removals: a dry run unless --execute.",
                           epilog=APPLY_EPILOG.format(prog=prog), formatter_class=argparse.RawDescriptionHelpFormatter)
    apply.add_argument("plan", help="plan file from `dedupe plan`")
    apply.add_argument("--action", required=True, choices=["move", "hardlink", "symlink", "delete"],
                       help="what to do with each file to remove")
    apply.add_argument("--to", default=None, help="with --action move: folder to move the files to")
    mode = apply.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", dest="execute", action="store_false", default=False,
                      help="print what would be done (the default)")
    mode.add_argument("--execute", dest="execute", action="store_true", help="do it (writes an undo log first)")
    apply.add_argument("--log", default=None, help="undo log (default: undo-<time>.jsonl beside the plan)")

    undo = sub.add_parser("undo", help="restore the files an `apply --execute` changed, from its undo log",
                          description="Restore the files an `apply --execute` changed, from its undo log.",
                          epilog=UNDO_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    undo.add_argument("log", help="undo log written by `dedupe apply --execute`")

    report = sub.add_parser("report", help="rebuild OUT/report/ from a finished run's outputs",
                            description="Rebuild the review report of a finished run (its thumbnails "
                                        "and drawings are reused where they can be).",
                            epilog=REPORT_EPILOG.format(prog=prog),
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    report.add_argument("out", help="output folder of a finished run, or its URL on a store (a new generation is "
                                    "published there with the run's files and the rebuilt report)")
    report.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a report setting, e.g. --set report.keep=oldest, or give OUT's store "
                             "options, --set 'storage.options={...}' (repeatable)")
    report.add_argument("--config", default=None, metavar="FILE",
                        help="YAML config file (e.g. the nightly run's): its report section, if any, applies "
                             "to the rebuilt report (before --set), its storage.options open OUT on a store; "
                             "its other sections are checked, not used")
    return parser


def store_options(args, allowed: tuple[str, ...] = ()) -> dict:
    """storage.options for a command that reads a finished run or a catalog (plan, report, query):
    those of `--config FILE` (the whole file is validated, as a run's), then `--set storage.*`.
    Other `--set` keys than `allowed` prefixes are refused. ConfigError (exit 2) for a bad file."""
    overrides = getattr(args, "overrides", [])
    bad = [o for o in overrides if not o.strip().startswith(("storage.", *allowed))]
    if bad:
        known = " and ".join(f"{p}*" for p in (*allowed, "storage."))
        raise ConfigError(f"--set {bad[0]!r}: only {known} settings apply to `{args.command}`")
    return load_config(args.config, [o for o in overrides if o.strip().startswith("storage.")]).storage.options


def _refused_by_store(out: str, exc: Exception) -> int:
    """A store that refuses or does not answer (credentials, endpoint): what to fix, exit 2."""
    from pipeline import storage
    print(f"error: {storage.access_error(out, exc, 'output location', 'OUT')}", file=sys.stderr)
    return EXIT_USAGE


def plan_command(args) -> int:
    from pipeline.actions import PlanError, make_plan, write_plan
    from pipeline.results import load_run
    if args.keep == "preferred_folder" and not args.prefer:
        print("error: --keep preferred_folder needs at least one --prefer DIR", file=sys.stderr)
        return EXIT_USAGE
    from pipeline import storage
    out = storage.local_form(args.out)  # (file:///x is the folder /x)
    try:
        storage.configure(store_options(args))
        run = load_run(out)
        plan = make_plan(run, args.keep, args.prefer)
        path = write_plan(plan, args.output or storage.join(out, "plan.parquet"))
    except (FileNotFoundError, PlanError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:
        if storage.is_url(out) or storage.is_url(args.output or ""):
            return _refused_by_store(out, exc)
        if not isinstance(exc, OSError):
            raise
        print(f"error: cannot write the plan ({exc}): choose a writable --output", file=sys.stderr)
        return EXIT_USAGE
    from pipeline.results import unmatched_folders
    for folder in unmatched_folders(run.images, args.prefer):
        print(f"warning: --prefer {folder!r} holds none of the run's files (a folder relative to DATA, or "
              "absolute): it decides no keeper", file=sys.stderr)
    removals = plan[plan["action"] == "remove"]
    print(f"{path}: {_counted(plan['cluster_id'].nunique(), 'cluster')}, {_counted(len(removals), 'file')} to remove "
          f"({int(removals['bytes'].sum())} bytes), keeper policy {args.keep}")
    return EXIT_OK


def apply_command(args) -> int:
    from pipeline import storage
    from pipeline.actions import PlanError, apply_plan, default_log_path, read_plan, stale_plan
    try:
        # (a dry run checks where the log and its trash would go, too)
        log = os.path.abspath(storage.local_path(args.log, "--log", PlanError) if args.log
                              else default_log_path(args.plan))
        to = storage.local_path(args.to, "--to", PlanError) if args.to is not None else None
        plan = read_plan(args.plan)
        why = stale_plan(plan, args.plan)
        if why:
            print(f"warning: {why}", file=sys.stderr)
        outcome = apply_plan(plan, args.action, to=to, execute=args.execute, log_path=log)
    except (PlanError, ConfigError) as exc:  # (ConfigError: a file:// URL of another host)
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    verb = "done" if args.execute else "would be done (dry run: nothing changed; add --execute)"
    print(f"{len(outcome.done)} {verb}, {len(outcome.refused)} refused, {len(outcome.failed)} failed")
    if args.execute and outcome.done:
        import shlex
        print(f"undo log: {log}  (restore with: {prog_name()} undo {shlex.quote(log)})")
    return EXIT_OK if outcome.ok else EXIT_FAILED


def undo_command(args) -> int:
    from pipeline.actions import PlanError, undo
    try:
        outcome = undo(args.log)
    except (PlanError, ConfigError) as exc:  # (ConfigError: a file:// URL of another host)
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(f"{len(outcome.done)} restored, {len(outcome.failed)} not restored")
    return EXIT_OK if outcome.ok else EXIT_FAILED


def report_command(args) -> int:
    """Rebuild the report with the run's config plus `--set report.*` overrides."""
    from pipeline.config import Config, config_from_dict
    from pipeline.results import load_run
    from pipeline import storage
    out = storage.local_form(args.out)  # (file:///x is the folder /x)
    try:
        storage.configure(store_options(args, allowed=("report.",)))
        run = load_run(out)
        try:
            base = config_from_dict(run.manifest.get("config") or {})
        except ConfigError:  # another version's config: rebuild with the defaults
            base = Config()
        if args.config:  # the file's report section (the whole file was checked by store_options)
            from pipeline.config import read_yaml
            if "report" in read_yaml(Path(args.config)):
                base.report = load_config(args.config).report
        cfg = load_config(None, [o for o in args.overrides if o.strip().startswith("report.")], base=base)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:
        if not storage.is_url(out):
            raise
        return _refused_by_store(out, exc)
    from pipeline.outdir import current_generation
    from pipeline.report import write_report
    if storage.is_url(out):  # a new generation with the run's files and the report made again
        from datetime import datetime, timezone
        run_id = f"{run.manifest.get('run_id') or 'run'}-report-{datetime.now(timezone.utc):%Y%m%dT%H%M%S%fZ}"
        try:
            gen = storage.republish_report(out, run_id, lambda folder, last: write_report(
                folder, run.images, run.pairs, run.manifest, cfg, reuse_from=last), of_run=run.manifest.get("run_id"))
        except (ConfigError, FileNotFoundError) as exc:  # e.g. OUT locked by a run (the holder is named)
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_USAGE
        except OSError as exc:  # the store failed midway (nothing was published; the message says what)
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_FAILED
        print(f"{storage.join(out, 'report', 'index.html')} (generation {gen})")
        return EXIT_OK
    # rebuilt inside the run's published generation, which OUT/report and OUT/report.html point into,
    # under OUT's lock: a run publishing meanwhile would drop the rebuilt report
    from pipeline.outdir import locked, run_id_of
    try:
        with locked(Path(run.out_dir), option="OUT (the run's folder must be writable to rebuild its report)"):
            where = current_generation(run.out_dir) or run.out_dir
            # (a run that published between the read above and the lock: its outputs would have
            # got the report of the run read, as on a store, `of_run`)
            now = run_id_of(where)
            if now != run.manifest.get("run_id"):
                raise ConfigError(f"OUT {str(out)!r} now holds another run ({now}) than the one read "
                                  f"({run.manifest.get('run_id')}): a run published meanwhile; run `dedupe report` again")
            print(write_report(where, run.images, run.pairs, run.manifest, cfg))
    except ConfigError as exc:  # another run holds OUT (named), or OUT cannot be written
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK


def driver_arrow_pool() -> str:
    """This process's Arrow allocations (the catalog's tables, pandas' Arrow-backed text, the
    output files) from jemalloc, which hands freed pages back to the OS within about a second,
    instead of Arrow's default mimalloc, which keeps them for reuse: the driver's peak RSS -44 MB
    on a 10k-file re-run, same run (docs/benchmarks.md, driver_memory_rerun). A pool named in
    ARROW_DEFAULT_MEMORY_POOL still decides, and a pyarrow built without jemalloc keeps its
    default. Dask workers are other processes and keep theirs. Returns the pool's name."""
    import pyarrow as pa
    if not os.environ.get("ARROW_DEFAULT_MEMORY_POOL"):
        try:
            pa.set_memory_pool(pa.jemalloc_memory_pool())
        except NotImplementedError:  # (not built with jemalloc: e.g. Windows wheels)
            pass
    return pa.default_memory_pool().backend_name


def main(argv: list[str] | None = None) -> int:
    prog = prog_name()
    os.environ.setdefault("DEDUPE_PROG", prog)  # messages deeper down name the same command
    args = build_parser(prog).parse_args(argv)
    # the Azure SDK logs every HTTP request, headers and all, at INFO: thousands of lines a run on
    # az://, under --quiet too
    if getattr(args, "log_level", "INFO") != "DEBUG":
        logging.getLogger("azure").setLevel(logging.WARNING)
        # (gcsfs logs each failed request's traceback, ~50 lines, before the error this tool
        # reports with what to fix)
        logging.getLogger("gcsfs").setLevel(logging.CRITICAL)
        # (FAISS's loader logs, at INFO, each CPU build it tries and the ModuleNotFoundError of
        # those it lacks, 8 lines per high-recall run that read like a failure)
        logging.getLogger("faiss").setLevel(logging.WARNING)
    commands = {"plan": plan_command, "apply": apply_command, "undo": undo_command, "report": report_command}
    if args.command in commands:
        return commands[args.command](args)
    if args.command == "weights":
        from pipeline.weights import weights_command
        try:
            return weights_command(args.from_dir)
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_USAGE

    # TensorFlow's C++ start-up chatter (oneDNN notices) is noise in a batch log; workers inherit this
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if args.command == "query":
        return _query_command(args)
    logging.basicConfig(level=getattr(logging, args.log_level), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("pipeline")
    STOP.reset()
    previous = signal.signal(signal.SIGTERM, _stop)  # Airflow, systemd, kill: stop cleanly, exit 1
    previous_int = signal.signal(signal.SIGINT, _stop)  # Ctrl-C: the same
    manifest = None
    try:
        set_catalog = [o for o in args.overrides if o.strip().startswith("catalog=")
                       and o.split("=", 1)[1].strip().lower() not in ("none", "null", "")]
        if (args.catalog is not None or set_catalog) and args.no_catalog:
            raise ConfigError(f"{'--catalog' if args.catalog is not None else '--set ' + set_catalog[0]} and "
                              "--no-catalog contradict each other: pass one of them")
        # (each of these was settled in silence, the flag or the last one winning)
        set_tiers = [o for o in args.overrides if o.strip().startswith("tiers=")  # (a bad value: said as such)
                     and o.split("=", 1)[1].strip() in ("screen", "verify", "confirm")]
        for flag, given, said in (("--catalog", args.catalog, set_catalog), ("--tiers", args.tiers, set_tiers)):
            if given is not None and said and said[-1].split("=", 1)[1].strip() != str(given):
                raise ConfigError(f"{flag} {given} and --set {said[-1].strip()} contradict each other: pass one of them")
        if args.config is not None and len(args.config) > 1:
            raise ConfigError(f"--config is given {len(args.config)} times (only the last one would apply): put "
                              "the settings in one file, or give the others' keys with --set")
        args.config = args.config[0] if args.config else None
        if args.scheduler is not None and not args.scheduler.strip():
            raise ConfigError("--scheduler is empty (it meant 'auto'): give auto, local, sync or a scheduler address")
        overrides = list(args.overrides) + ([f"tiers={args.tiers}"] if args.tiers else [])
        overrides += [f"catalog={args.catalog}"] if args.catalog is not None else []
        overrides += ["catalog=none"] if args.no_catalog else []
        cfg = load_config(args.config, overrides, preset=args.preset)
        from pipeline.run import run  # heavy imports only after the config is known to be good
        driver_arrow_pool()
        started = time.perf_counter()
        manifest = run(args.data, args.out, cfg, scheduler=args.scheduler, quiet=args.quiet, rehash=args.rehash)
        # published: a signal from here on must not turn a completed run into a failed one (exit
        # 143/130 after the outputs were committed made Airflow retry a run that had succeeded)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (KeyboardInterrupt, Stopped) as exc:
        what = signal.Signals(exc.signum).name if isinstance(exc, Stopped) else "SIGINT"
        print(f"stopped by {what}: temporary files removed; " + (
            getattr(exc, "published", None) or "the previous outputs (if any) are untouched"), file=sys.stderr)
        return EXIT_FAILED
    except Exception as exc:  # (`published`: it failed after the outputs on a store were committed)
        if isinstance(exc, OSError) and not getattr(exc, "published", None) and (
                exc.errno == errno.ENOSPC or "No space left on device" in str(exc)):
            # (a full disk is the operator's to fix, not a bug: one line, no traceback)
            log.error("the run failed: no space left on the device (%s): free some space or choose another "
                      "--out / work_dir, and run again; the previous outputs (if any) are untouched",
                      exc.filename or exc)
            return EXIT_FAILED
        from pipeline.outdir import OutReplaced
        if isinstance(exc, OutReplaced):  # (the operator's doing, not a bug: one line)
            log.error("the run failed: %s", exc)
            return EXIT_FAILED
        if isinstance(exc, NoWorkers) and not getattr(exc, "published", None):  # (the cluster's to fix, not a bug: one line, no traceback)
            log.error("the run failed: %s; the previous outputs (if any) are untouched", exc)
            return EXIT_FAILED
        log.exception(f"the run failed: {exc.published}" if getattr(exc, "published", None)
                      else "the run failed; the previous outputs (if any) are untouched")
        return EXIT_FAILED
    finally:
        if manifest is None:  # (a completed run keeps ignoring them until it returns)
            # called from Python: its own handlers back; the command, which now exits 1 or 2,
            # ignores them (with the defaults back, a second signal during the interpreter's
            # shutdown turned exit 1 into 143)
            back = argv is not None
            signal.signal(signal.SIGTERM, previous if back else signal.SIG_IGN)
            signal.signal(signal.SIGINT, previous_int if back else signal.SIG_IGN)
        STOP.reset()  # (a later run in this process, e.g. pipeline.run.run, starts with none)
    c = manifest["counts"]
    log.info("done in %.1fs: %s (%s), %s, %s -> %s", time.perf_counter() - started, _counted(c["files"], "file"),
             _counted(c["errors"], "error"), _counted(c["duplicate_pairs"], "duplicate pair"),
             _counted(c["clusters"], "cluster"), args.out)
    if argv is not None:  # called from Python (a test, a notebook): its own handlers back
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)
    # (the command itself goes on ignoring them until it exits: with the default SIGTERM back,
    # a signal in the ~0.5-0.9 s before the process ended turned a finished run into exit 143)
    return EXIT_OK


def _query_command(args) -> int:
    logging.basicConfig(level=getattr(logging, args.log_level), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("pipeline")
    from pipeline import storage
    try:
        if args.output:
            args.output = storage.local_path(args.output, "--output")
        if args.output and os.path.splitext(args.output)[1].lower() not in (".parquet", ".csv", ".json"):
            raise ConfigError(f"--output {args.output!r}: the extension must be .parquet, .csv or .json")
        if args.output and not os.path.isdir(os.path.dirname(os.path.abspath(args.output))):
            raise ConfigError(f"--output {args.output!r}: its folder does not exist; create it first")
        if args.output:  # (before any work: with --add the catalog is written before the output)
            folder = os.path.dirname(os.path.abspath(args.output))
            try:
                with tempfile.TemporaryFile(dir=folder):
                    pass
            except OSError as exc:
                raise ConfigError(f"--output {args.output!r}: its folder cannot be written ({exc.strerror}); "
                                  "choose another") from None
        from pipeline import query
        from pipeline.config import config_from_dict
        from pipeline.run import check_reachable, dask_client, target_of
        driver_arrow_pool()  # (the catalog's tables are read whole)
        # the store options of --config and --set storage.*=… (a catalog on a store), which the
        # workers get too
        # (the settings the query's tiers use; dask.*, catalog, work_dir, report.* and scan.* were
        # accepted and ignored)
        settings = config_from_dict({"storage": {"options": store_options(
            args, allowed=("screen.", "verify.", "embed.", "decide.", "tiers="))}})
        check_reachable(target_of(settings, args.scheduler))  # (a port that never answers: a wait forever)
        with dask_client(settings, args.scheduler) as client:
            result = query.query(args.images, args.catalog, overrides=args.overrides, add=args.add, client=client,
                                 storage_options=settings.storage.options)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_FAILED
    except NoWorkers as exc:
        log.error("the query failed: %s", exc)
        return EXIT_FAILED
    except Exception:
        log.exception("the query failed")
        return EXIT_FAILED
    if args.output:
        try:
            query.write_result(result, args.output)
        except OSError as exc:  # (a disk that filled, a folder made read-only since the check)
            print(f"error: --output {args.output!r} cannot be written ({exc.strerror or exc})"
                  + ("; the images were added to the catalog" if args.add else ""), file=sys.stderr)
            return EXIT_FAILED
    else:
        print(query.format_table(result))
    return EXIT_OK


if __name__ == "__main__":  # (`python -m pipeline.cli ...` did nothing and exited 0)
    raise SystemExit(main())
