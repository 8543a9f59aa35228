"""The Hydra callback that summarises a multirun when it ends (registered in conf/config.yaml).

It runs in the launching process after the last job, reads what the jobs left on disk and writes
``summary.csv``, ``summary.md`` and the plots into the sweep directory (runner.sweep.report). The jobs'
results are already safe on disk by then, so a report that cannot be written is one warning line, never a
failed sweep.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from mla_runner.sweep.report import SUMMARY_MD, collect, write_summary
from mla_runner.sweep.result import one_line

log = logging.getLogger(__name__)
# Jobs of the last multirun of this process whose result says they failed: the command line exits non-zero then
# (jobs a launcher ran in other processes count too, as the summary reads them from disk).
failed_jobs = 0


class SweepSummary(Callback):
    """``on_multirun_end``: summarise every job's ``result.json`` under ``hydra.sweep.dir``."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        global failed_jobs
        try:
            sweep_dir = Path(config.hydra.sweep.dir)
            results = collect(sweep_dir)
            failed = failed_jobs = sum(result["status"] != "ok" for result in results)
            write_summary(sweep_dir, results)
            if failed:
                log.warning("%d of %d jobs failed: see %s", failed, len(results), sweep_dir / SUMMARY_MD)
            else:
                log.info("sweep summary of %d jobs: %s", len(results), sweep_dir / SUMMARY_MD)
        except Exception as e:  # noqa: BLE001 - the sweep itself has succeeded; say why the report did not
            log.warning("sweep summary not written: %s: %s", type(e).__name__, one_line(str(e)))
