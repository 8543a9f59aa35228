"""Tasks: what a run does once its config is composed (``task=NAME``)."""
from runner.tasks.generate import run_generate

TASKS = {"generate": run_generate}
