"""Command line: `dedupe dedupe DATA --out OUT [...]` (also `python -m pipeline dedupe ...`), and
`dedupe plan|apply|undo` to act on the results, `dedupe report` to rebuild the report.

Exit codes: 0 the run completed (unreadable files are recorded in the output, not fatal);
2 usage or configuration error, with a message saying what to fix; 1 the run failed.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from pipeline.config import KEEP_POLICIES, ConfigError, load_config

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse exits 2 on usage errors already; keep its message
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dedupe", description="Find duplicate and near-duplicate images in a folder tree.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    run = sub.add_parser("dedupe", help="run the cascade on a folder and write Parquet + report")
    run.add_argument("data", help="folder of images (scanned recursively)")
    run.add_argument("--out", default="out", help="output folder (default: out)")
    run.add_argument("--config", default=None, help="YAML config (default: built-in defaults = configs/default.yaml)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config key, e.g. --set screen.max_distance=12 (repeatable)")
    run.add_argument("--tiers", choices=["screen", "verify", "confirm"], default=None,
                     help="last tier to run (same as --set tiers=...)")
    run.add_argument("--scheduler", default=None,
                     help="'local' (default), 'sync' (in-process, for debugging) or a Dask scheduler "
                          "address such as tcp://127.0.0.1:8786 (DASK_SCHEDULER_ADDRESS works too)")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    run.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])

    weights = sub.add_parser("weights", help="seed the Keras weights cache from a local folder")
    weights.add_argument("--from", dest="from_dir", required=True, help="folder holding the .h5 weight files")

    plan = sub.add_parser("plan", help="write a keep/remove plan for a finished run's clusters")
    plan.add_argument("out", help="output folder of a finished run")
    plan.add_argument("--keep", required=True, choices=KEEP_POLICIES, help="which member of each cluster to keep")
    plan.add_argument("--prefer", action="append", default=[], metavar="DIR",
                      help="with --keep preferred_folder: a folder (relative to DATA, or absolute) whose files "
                           "are kept first (repeatable, best first)")
    plan.add_argument("--output", default=None, help="plan file, .parquet or .csv (default: OUT/plan.parquet)")

    apply = sub.add_parser("apply", help="carry out a plan on the files (a dry run unless --execute)")
    apply.add_argument("plan", help="plan file from `dedupe plan`")
    apply.add_argument("--action", required=True, choices=["move", "hardlink", "symlink", "delete"],
                       help="what to do with each file to remove")
    apply.add_argument("--to", default=None, help="with --action move: folder to move the files to")
    mode = apply.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", dest="execute", action="store_false", default=False,
                      help="print what would be done (the default)")
    mode.add_argument("--execute", dest="execute", action="store_true", help="do it (writes an undo log first)")
    apply.add_argument("--log", default=None, help="undo log (default: undo-<time>.jsonl beside the plan)")

    undo = sub.add_parser("undo", help="restore the files an `apply --execute` changed, from its undo log")
    undo.add_argument("log", help="undo log written by `dedupe apply --execute`")

    report = sub.add_parser("report", help="rebuild OUT/report/ from a finished run's outputs")
    report.add_argument("out", help="output folder of a finished run")
    report.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a report setting, e.g. --set report.keep=oldest (repeatable)")
    return parser


def plan_command(args) -> int:
    from pipeline.actions import PlanError, make_plan, write_plan
    from pipeline.results import load_run
    if args.keep == "preferred_folder" and not args.prefer:
        print("error: --keep preferred_folder needs at least one --prefer DIR", file=sys.stderr)
        return EXIT_USAGE
    try:
        run = load_run(args.out)
        plan = make_plan(run, args.keep, args.prefer)
        path = write_plan(plan, args.output or os.path.join(args.out, "plan.parquet"))
    except (FileNotFoundError, PlanError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    removals = plan[plan["action"] == "remove"]
    print(f"{path}: {plan['cluster_id'].nunique()} clusters, {len(removals)} files to remove "
          f"({int(removals['bytes'].sum())} bytes), keeper policy {args.keep}")
    return EXIT_OK


def apply_command(args) -> int:
    from pipeline.actions import PlanError, apply_plan, default_log_path, read_plan
    try:
        plan = read_plan(args.plan)
        log = (args.log or default_log_path(args.plan)) if args.execute else None
        outcome = apply_plan(plan, args.action, to=args.to, execute=args.execute, log_path=log)
    except PlanError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    verb = "done" if args.execute else "would be done (dry run: nothing changed; add --execute)"
    print(f"{len(outcome.done)} {verb}, {len(outcome.refused)} refused, {len(outcome.failed)} failed")
    if args.execute and outcome.done:
        print(f"undo log: {log}  (restore with: dedupe undo {log})")
    return EXIT_OK if outcome.ok else EXIT_FAILED


def undo_command(args) -> int:
    from pipeline.actions import PlanError, undo
    try:
        outcome = undo(args.log)
    except PlanError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(f"{len(outcome.done)} restored, {len(outcome.failed)} not restored")
    return EXIT_OK if outcome.ok else EXIT_FAILED


def report_command(args) -> int:
    """Rebuild the report with the run's config plus `--set report.*` overrides."""
    from pipeline.config import Config, config_from_dict
    from pipeline.results import load_run
    try:
        run = load_run(args.out)
        try:
            base = config_from_dict(run.manifest.get("config") or {})
        except ConfigError:  # another version's config: rebuild with the defaults
            base = Config()
        bad = [o for o in args.overrides if not o.strip().startswith("report.")]
        if bad:
            raise ConfigError(f"--set {bad[0]!r}: only report.* settings apply to a rebuilt report")
        cfg = load_config(None, args.overrides, base=base)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    from pipeline.report import write_report
    print(write_report(run.out_dir, run.images, run.pairs, run.manifest, cfg))
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
    logging.basicConfig(level=getattr(logging, args.log_level), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("pipeline")
    try:
        overrides = list(args.overrides) + ([f"tiers={args.tiers}"] if args.tiers else [])
        cfg = load_config(args.config, overrides)
        from pipeline.run import run  # heavy imports only after the config is known to be good
        started = time.perf_counter()
        manifest = run(args.data, args.out, cfg, scheduler=args.scheduler, quiet=args.quiet)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted: the previous outputs (if any) are untouched", file=sys.stderr)
        return EXIT_FAILED
    except Exception:
        log.exception("the run failed; the previous outputs (if any) are untouched")
        return EXIT_FAILED
    c = manifest["counts"]
    log.info("done in %.1fs: %d files (%d errors), %d duplicate pairs, %d clusters -> %s",
             time.perf_counter() - started, c["files"], c["errors"], c["duplicate_pairs"], c["clusters"],
             args.out)
    return EXIT_OK
