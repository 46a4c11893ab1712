"""Command line: `dedupe DATA --out OUT [...]` (also `python -m pipeline dedupe ...`).

Exit codes: 0 the run completed (unreadable files are recorded in the output, not fatal);
2 usage or configuration error, with a message saying what to fix; 1 the run failed.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from pipeline.config import ConfigError, load_config

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

    report = sub.add_parser("report", help="rebuild OUT/report/ from a finished run's outputs")
    report.add_argument("out", help="output folder of a finished run")
    report.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a report setting, e.g. --set report.keep=oldest (repeatable)")
    return parser


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
    if args.command == "report":
        return report_command(args)
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
