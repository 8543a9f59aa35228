"""Tasks: what a run does once its config is composed (``task=NAME``). Each is called as ``task(run_config,
output_dir, should_stop)`` and returns a dict with ``metrics`` (scalars) and optionally ``rows`` (measurements) for
the job's result.json; ``should_stop()`` says that a signal asked the run to stop (mla_runner.stop)."""
from typing import Any

from mla_runner.tasks.bench import run_bench
from mla_runner.tasks.generate import run_generate

TASKS = {"generate": run_generate, "bench": run_bench}
# The metric a run returns to a sweeper unless ``objective`` names another: a task's, or a bench mode's.
HEADLINES = {"generate": "tokens_per_s", "decode": "tokens_per_s", "kernel": "time_us", "metadata": "metadata_us",
             "prefill": "prefill_tokens_per_s", "throughput": "tokens_per_s"}


def headline(task: Any) -> str:
    return HEADLINES[getattr(task, "mode", task.name)]
