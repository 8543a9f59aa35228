"""``python -m mla_runner``: the Hydra entry point.

Every job writes ``resolved_config.yaml`` and ``result.json`` into its output directory. A user error
(bad config value, missing checkpoint, ...) is one line on stderr; in a single run it ends the process
with exit code 1, in a multirun it is recorded in the job's result.json and the sweep goes on. Between
jobs of a multirun (one process, Hydra's basic launcher) the engine, its CUDA graphs and its cache are
dropped and the allocator's cache emptied.

Under ``torchrun --nproc-per-node N -m mla_runner ...`` every process runs the same jobs
(``mla_runner.engine.distributed``); rank 0 alone writes the output directory: the other ranks' Hydra writes nothing
(no run dir, no logs, no sweep summary) and their tasks print nothing.
"""
from __future__ import annotations

import gc
import logging
import sys
import tempfile
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from mla_runner.compose import CONF_DIR, compose_config, to_run_config
from mla_runner.config import register_configs
from mla_runner.engine.distributed import rank, shutdown
from mla_runner.errors import ConfigError, UserError
from mla_runner.sweep.result import RESULT_FILE, hydra_job_info, make_result, write_result

log = logging.getLogger(__name__)

register_configs()


def _prevalidate(argv: list[str]) -> None:
    """Compose a single run's overrides once before Hydra does, so a bad value costs one line, not a
    multi-line report. Multiruns and Hydra's own flags are left to Hydra."""
    if any(arg.startswith("-") for arg in argv):
        return
    try:
        compose_config(argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> None:
    output_dir = Path(HydraConfig.get().runtime.output_dir)
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    writer = rank() == 0
    if writer:
        (output_dir / "resolved_config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    run, outcome, error = None, {}, None
    try:
        run = to_run_config(cfg)
        from mla_runner.tasks import TASKS

        outcome = TASKS[run.task.name](run, output_dir)
    except UserError as e:
        error = str(e)
        if writer:  # the other ranks meet the same error
            print(f"error: {e}", file=sys.stderr)
    except Exception as e:  # a bug: the sweep records it and goes on; a single run shows the traceback
        error = f"{type(e).__name__}: {e}"
        if not multirun:
            raise
        log.exception("job failed")
    finally:
        if writer:
            result = make_result(run, hydra_job_info(), outcome.get("metrics"), outcome.get("rows"), error)
            write_result(output_dir / RESULT_FILE, result)
        _release_memory()
    if error is not None and not multirun:
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
            return
        with tempfile.TemporaryDirectory(prefix=f"runner-rank{rank()}-") as scratch:
            sys.argv += QUIET_RANK_OVERRIDES + [f"hydra.run.dir={scratch}", f"hydra.sweep.dir={scratch}"]
            main()
    finally:
        shutdown()
