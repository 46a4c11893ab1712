"""Side-by-side accuracy of several `make eval` runs (their `--json` dumps): before/after a change.

    python -m bench.eval --json before.json --set screen.dihedral=false ...   # one run per variant
    python -m bench.compare --section screen_recall --title "..." before.json:"label" after.json:"label" ...

Writes per-set final and screen figures and the generated set's recall per transform, one column
per run, into a section of docs/benchmarks.md (or prints it with --print).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench.report import stamp, table, update_section


def load(spec: str) -> tuple[str, dict]:
    path, _, label = spec.partition(":")
    return label or Path(path).stem, json.loads(Path(path).read_text())


def _by_set(run: dict) -> dict:
    return {r["set"]: r for r in run["results"]}


def _options(run: dict) -> str:
    given = ([f"--preset {run['preset']}"] if run.get("preset") else []) + list(run.get("overrides") or [])
    return " ".join(given) or "defaults"


def render(runs: list[tuple[str, dict]]) -> str:
    labels = [label for label, _ in runs]
    sets = list(dict.fromkeys(s for _, run in runs for s in _by_set(run)))
    out = ["Runs compared (pipeline overrides in brackets): " + "; ".join(
        f"**{label}** [{_options(run)}]" for label, run in runs) + "\n"]
    made = [(label, run["made"]) for label, run in runs if run.get("made")]
    if made:  # (the stamp above is where the comparison was rendered; each run's own is here)
        out.append("Each run made on: " + "; ".join(
            f"**{label}**: {m['machine']}, commit {m['commit']}, {m['date']}, `{m['command']}`" for label, m in made)
            + "\n")
    rows = []
    for name in sets:
        for label, run in runs:
            r = _by_set(run).get(name)
            if not r or "score" not in r:
                continue
            s = r["score"]
            tiers = s["tiers"]
            rows.append([name, label, s["true_pairs"], tiers["screen"]["recall"], tiers["screen"]["predicted"],
                         s["final"]["precision"], s["final"]["recall"], s["final"]["f1"], s["clusters"]["f1"],
                         f"{r['run']['seconds']:.1f}"])
    out.append("### Per set: screen recall (the cascade's ceiling) and final verdicts\n")
    out.append(table(["set", "run", "true pairs", "screen R", "candidates", "final P", "final R", "final F1",
                      "clusters F1", "wall s (one run)"], rows))
    gen = [(label, _by_set(run).get("generated")) for label, run in runs]
    gen = [(label, r) for label, r in gen if r and "score" in r]
    if gen:
        transforms = list(gen[0][1]["score"]["per_transform"])
        rows = []
        for t in transforms:
            first = gen[0][1]["score"]["per_transform"][t]
            row = [t, first.get("category", ""), first["n"]]
            for _, r in gen:
                pt = r["score"]["per_transform"].get(t, {})
                row.append(f"{pt.get('screen_recall', float('nan')):.2f} / {pt.get('final_recall', float('nan')):.2f}")
            rows.append(row)
        out.append("\n### Generated set: screen / final recall per transform\n")
        out.append(table(["transform", "category", "pairs", *labels], rows))
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="JSON:label, in column order")
    parser.add_argument("--section", default="compare")
    parser.add_argument("--title", default="accuracy before / after")
    parser.add_argument("--intro", default="")
    parser.add_argument("--out", default=None)
    parser.add_argument("--print", action="store_true", help="print instead of writing the docs")
    args = parser.parse_args()
    body = render([load(s) for s in args.runs])
    if args.print:
        print(body)
        return
    text = stamp() + ("\n" + args.intro.strip() + "\n" if args.intro else "") + "\n" + body
    kwargs = {"path": args.out} if args.out else {}
    update_section(args.section, args.title, text, **kwargs)


if __name__ == "__main__":
    main()
