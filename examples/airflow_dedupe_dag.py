"""Airflow DAG: run the duplicate detection nightly over a growing collection.

Each run goes into the same OUT, so it reuses OUT/catalog: only new or changed files are read
and only new pairs are scored (README, "Incremental runs and the catalog"). Copy this file into
your DAGs folder and set the Airflow Variables dedupe_bin, dedupe_data and dedupe_out (or edit
the defaults below). They are read when the task runs (templates), not each time the scheduler
parses this file: a `Variable.get` at the top of a DAG file asks the metadata database on every parse.

Exit codes of the job: 0 done; 1 failed or stopped (retried); 2 configuration error or OUT/catalog
in use by another run: not retried (`DedupeOperator`), since the same settings fail the same way:
fix them, or let the other run finish.
"""
from __future__ import annotations

from datetime import datetime, timedelta

from airflow import DAG
from airflow.exceptions import AirflowException, AirflowFailException
from airflow.operators.bash import BashOperator

# the task's environment, rendered when it runs (an AIRFLOW_VAR_DEDUPE_* environment variable works too)
PATHS = {"DEDUPE_BIN": "{{ var.value.get('dedupe_bin', '/srv/dedupe/.venv/bin/dedupe') }}",
         "DEDUPE_DATA": "{{ var.value.get('dedupe_data', '/data/photos') }}",
         "DEDUPE_OUT": "{{ var.value.get('dedupe_out', '/data/dedupe') }}"}
COMMAND = '"$DEDUPE_BIN" dedupe "$DEDUPE_DATA" --out "$DEDUPE_OUT" --quiet'  # (quoted: a path may hold spaces)


class DedupeOperator(BashOperator):
    """The job as a bash command (Airflow's SIGTERM, on a timeout or "mark failed", stops it
    cleanly: exit 1, the outputs as they were before the run; the catalog may already hold what
    the run learnt, which the next run reuses), whose exit 2 fails the task without its retries."""

    def execute(self, context):
        try:
            return super().execute(context)
        except AirflowException as exc:
            if str(exc).rstrip(".").endswith("exit code 2"):
                raise AirflowFailException(f"{exc} (a configuration error, or OUT in use: not retried)") from exc
            raise


with DAG(
    dag_id="dedupe_nightly",
    description="tiered image duplicate detection, incremental via OUT/catalog",
    schedule="0 2 * * *",
    start_date=datetime(2024, 1, 1),
    catchup=False,
    max_active_runs=1,  # one run per OUT (the job also refuses a second one: exit 2)
    default_args={"retries": 2, "retry_delay": timedelta(minutes=10)},
    tags=["dedupe"],
) as dag:
    DedupeOperator(
        task_id="dedupe",
        bash_command=COMMAND,
        env=PATHS,
        append_env=True,  # (PATH, HOME, credentials: the worker's environment as well)
        execution_timeout=timedelta(hours=6),
    )
