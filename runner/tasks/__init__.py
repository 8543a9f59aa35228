"""Tasks: what a run does once its config is composed (``task=NAME``). Each returns a dict with
``metrics`` (scalars) and optionally ``rows`` (measurements) for the job's result.json."""
from mla_runner.tasks.bench import run_bench
from mla_runner.tasks.generate import run_generate

TASKS = {"generate": run_generate, "bench": run_bench}
