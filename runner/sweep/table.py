"""A sweep's results as one table: a line per measurement row, or per job when a job has no rows.

Both the CSV and the Markdown summary are views of these lines, so they always agree. A line is the job's
number and status, its config, its metrics, one of its rows, then its error and where it ran; a row's value
wins over a metric or config value of the same name (a benchmark row's ``batch`` is the job's ``batch``),
and the job's own columns win over all of them.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from mla_runner.sweep.result import KEY_ORDER

JOB_COLUMNS = ("job", "status")
TAIL_COLUMNS = ("error", "override_dirname", "output_dir")


@dataclass
class Table:
    lines: list[dict]
    config_columns: list[str]  # what was chosen: the job's config keys
    measure_columns: list[str]  # what was measured: metric and row keys that are not config keys

    @property
    def columns(self) -> list[str]:
        return [*JOB_COLUMNS, *self.config_columns, *self.measure_columns, *TAIL_COLUMNS]


def make_table(results: list[dict]) -> Table:
    """The summary lines of ``results`` (as ``report.collect`` returns them) and their columns, in order."""
    lines = []
    for result in results:
        job = result["job"]
        head = {"job": job.get("num"), "status": result["status"]}
        tail = {"error": result["error"], "override_dirname": job.get("override_dirname"),
                "output_dir": job.get("output_dir")}
        for row in result["rows"] or [{}]:
            lines.append({**result["config"], **result["metrics"], **row, **head, **tail})
    config_keys = _union(result["config"] for result in results)
    config_columns = [*(k for k in KEY_ORDER if k in config_keys), *(k for k in config_keys if k not in KEY_ORDER)]
    measured = _union(part for result in results for part in (result["metrics"], *result["rows"]))
    reserved = {*config_columns, *JOB_COLUMNS, *TAIL_COLUMNS}
    return Table(lines, config_columns, [key for key in measured if key not in reserved])


def _union(dicts: Iterable[dict]) -> list[str]:
    """All keys, in the order they are first seen."""
    return list(dict.fromkeys(key for d in dicts for key in d))
