"""Tasks: what a run does once its config is composed (``task=NAME``). Each is called as ``task(run_config,
output_dir, should_stop)`` and returns a dict with ``metrics`` (scalars) and optionally ``rows`` (measurements) for
the job's result.json; ``should_stop()`` says that a signal asked the run to stop (mla_runner.stop)."""
from mla_runner.tasks.bench import run_bench
from mla_runner.tasks.generate import run_generate

TASKS = {"generate": run_generate, "bench": run_bench}
