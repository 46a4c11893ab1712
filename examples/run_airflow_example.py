"""Run examples/airflow_dedupe_dag.py once with Airflow's `dag.test()` (no scheduler, no webserver).

Used by `make airflow-example`, which installs Airflow in its own virtualenv and points the DAG's
Variables (environment variables AIRFLOW_VAR_DEDUPE_*) at a folder and an OUT. Exit 0 when the DAG
run succeeded and OUT/run.json was written by it.
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path


def main(dag_file: str, expect: str = "success") -> int:
    """`expect` "success", or "no-retry": the job exits 2 (e.g. DATA missing), and the task must
    fail at once, its retries left unused."""
    spec = importlib.util.spec_from_file_location("dedupe_dag", dag_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if expect == "no-retry":
        run = module.dag.test()
        states = {ti.task_id: str(ti.state) for ti in run.get_task_instances()}
        if str(run.state) != "failed" or set(states.values()) != {"failed"}:
            print(f"DAG run {run.state}, tasks {states}: exit 2 should fail the task without a retry",
                  file=sys.stderr)
            return 1
        print(f"DAG run {run.state} at once on exit 2 (tasks {states}, retries unused)")
        return 0
    for task in module.dag.tasks:  # a test run fails at once instead of waiting for the retries
        task.retries = 0
    run = module.dag.test()
    if str(run.state) != "success":
        print(f"DAG run {run.state}", file=sys.stderr)
        return 1
    out = Path(os.environ["AIRFLOW_VAR_DEDUPE_OUT"])
    manifest = json.loads((out / "run.json").read_text())
    print(f"DAG run {run.state}: {manifest['counts']['files']} files, "
          f"{manifest['counts']['duplicate_pairs']} duplicate pairs, reuse: "
          f"{json.dumps(manifest['reuse'].get('screen', {}))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(*sys.argv[1:3]))
