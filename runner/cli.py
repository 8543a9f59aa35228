"""``mla-runner`` / ``python -m mla_runner``: the Hydra entry point.

Every job writes ``resolved_config.yaml`` and ``result.json`` into its output directory, whose ``status`` is
``ok``, ``error`` or ``interrupted``. A user error (bad config value, missing checkpoint, ...) is one line on stderr;
in a single run it ends the process with exit code 1, in a multirun it is recorded in the job's result.json and the
sweep goes on, and the sweep exits with 1 once its summary is written. SIGINT or SIGTERM stop a run at its next step
boundary (``mla_runner.stop``): the job records ``interrupted`` with its figures so far, and the process exits with
130 or 143 (a multirun stops there). A job never writes into a directory another live run holds, nor over an
earlier run's results (``mla_runner.rundir``). Between jobs of a multirun (one process, Hydra's basic launcher) the
engine, its CUDA graphs and its cache are dropped and the allocator's cache emptied.

Under ``torchrun --nproc-per-node N -m mla_runner ...`` every process runs the same jobs
(``mla_runner.engine.distributed``); rank 0 alone writes the output directory: the other ranks' Hydra writes nothing
(no run dir, no logs, no sweep summary) and their tasks print nothing.
"""
from __future__ import annotations

import gc
import logging
import math
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from mla_runner.compose import CONF_DIR, compose_config, register_resolvers, to_run_config
from mla_runner.config import register_configs
from mla_runner.engine.distributed import rank, shutdown
from mla_runner.errors import Interrupted, UserError
from mla_runner.rundir import RESOLVED_CONFIG, check_run_dir, claim_run_dir, resume_mismatch, run_options
from mla_runner.stop import StopSignals
from mla_runner.sweep import callback
from mla_runner.sweep.result import RESULT_FILE, hydra_job_info, make_result, write_result

log = logging.getLogger(__name__)

register_configs()
register_resolvers()
_failed_jobs = 0  # jobs of this process's multirun that failed (the sweep exits non-zero)


def _prevalidate(argv: list[str]) -> None:
    """Compose a single run's overrides once before Hydra does, so a bad value costs one line, not a multi-line
    report, and check a run directory given on the command line before Hydra writes into it. Multiruns and Hydra's
    own flags are left to Hydra."""
    if any(arg.startswith("-") for arg in argv):
        return
    try:
        run = compose_config(argv)
        run_dir = next((a.split("=", 1)[1] for a in argv if a.startswith("hydra.run.dir=")), None)
        if run_dir is not None and rank() == 0:
            check_run_dir(Path(run_dir), *run_options(run.task))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> float:
    """One job; returns its objective (``objective``: a metric of its result), NaN when it has none, which sweepers
    that optimize (Optuna, Ax, Nevergrad) read as a failed trial."""
    output_dir = Path(HydraConfig.get().runtime.output_dir)
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    writer = rank() == 0
    with ExitStack() as held:
        try:
            if writer:
                resume, outputs = run_options(cfg.task)
                held.enter_context(claim_run_dir(output_dir, resume, outputs))
                problem = resume_mismatch(output_dir, OmegaConf.to_container(cfg, resolve=True)) if resume else None
                if problem is not None:
                    raise UserError(problem)
        except UserError as e:  # nothing of this job is written: the directory is another run's
            print(f"error: {e}", file=sys.stderr)
            _job_failed(multirun)
            return math.nan
        return _run_job(cfg, output_dir, multirun, writer)


def _run_job(cfg: DictConfig, output_dir: Path, multirun: bool, writer: bool) -> float:
    stop = StopSignals(announce=writer)
    run, outcome, error, status = None, {}, None, "ok"
    try:
        if writer:
            (output_dir / RESOLVED_CONFIG).write_text(OmegaConf.to_yaml(cfg, resolve=True))
        with stop:
            run = to_run_config(cfg)
            from mla_runner.tasks import TASKS

            outcome = TASKS[run.task.name](run, output_dir, stop)
            objective = _objective(run, outcome.get("metrics", {}))
    except Interrupted as e:
        status, error, outcome = "interrupted", str(e), {"metrics": e.metrics}
        if writer:
            print(f"interrupted: {e}", file=sys.stderr)
    except UserError as e:
        status, error = "error", str(e)
        if writer:  # the other ranks meet the same error
            print(f"error: {e}", file=sys.stderr)
    except Exception as e:  # a bug: the sweep records it and goes on; a single run shows the traceback
        status, error = "error", f"{type(e).__name__}: {e}"
        if not multirun:
            raise
        log.exception("job failed")
    finally:
        if writer:
            result = make_result(run, hydra_job_info(), outcome.get("metrics"), outcome.get("rows"), error, status,
                                 outcome.get("resolved"))
            write_result(output_dir / RESULT_FILE, result)
        _release_memory()
    if status == "interrupted" or (multirun and stop()):  # a signal during a job that finished stops the sweep
        sys.exit(stop.exit_code)
    if status != "ok":
        _job_failed(multirun)
        return math.nan
    return objective


def _objective(run, metrics: dict) -> float:
    from mla_runner.tasks import headline

    name = run.objective or headline(run.task)
    value = metrics.get(name)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise UserError(f"objective={name} is not a figure of this run: choose one of "
                        f"{', '.join(k for k, v in metrics.items() if isinstance(v, (int, float)))}")
    return float(value)


def _job_failed(multirun: bool) -> None:
    """A single run ends with exit code 1; a multirun goes on, and exits with 1 at its end."""
    global _failed_jobs
    _failed_jobs += 1
    if not multirun:
        sys.exit(1)


def _release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# Hydra overrides for ranks > 0: no logs, no .hydra files, no sweep summary; what Hydra still creates (run
# and sweep dirs, multirun.yaml) goes to a scratch dir that is removed at the end.
QUIET_RANK_OVERRIDES = ["hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled",
                        "~hydra.callbacks.sweep_summary"]


def run() -> None:
    _prevalidate(sys.argv[1:])
    try:
        if rank() == 0:
            main()
        else:
            with tempfile.TemporaryDirectory(prefix=f"runner-rank{rank()}-") as scratch:
                sys.argv += QUIET_RANK_OVERRIDES + [f"hydra.run.dir={scratch}", f"hydra.sweep.dir={scratch}"]
                main()
    finally:
        shutdown()
    # a multirun returns here, its summary written: it failed if a job did (this process's or, with a launcher
    # that runs them elsewhere, one the summary found)
    if _failed_jobs or callback.failed_jobs:
        sys.exit(1)
