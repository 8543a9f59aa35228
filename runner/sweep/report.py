"""A sweep directory's summary: every job's ``result.json`` into ``summary.csv``, ``summary.md`` and plots.

The multirun callback calls this when a sweep ends; ``python -m mla_runner.sweep.report SWEEP_DIR`` does the
same for an existing directory (a sweep that was interrupted, or job directories gathered from several
machines). A job directory is one holding a ``result.json`` or Hydra's ``.hydra/`` record, so a job that
died without writing its result still shows up, as ``missing``; an unreadable file shows up as ``corrupt``.
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import sys
from pathlib import Path
from typing import Optional

import yaml

from mla_runner.sweep.markdown import render_markdown
from mla_runner.sweep.result import RESULT_FILE, SCHEMA_VERSION, one_line
from mla_runner.sweep.table import Table, make_table

log = logging.getLogger(__name__)

SUMMARY_CSV = "summary.csv"
SUMMARY_MD = "summary.md"
# The parts of a result that later code indexes, and their types.
SHAPE = {"job": dict, "config": dict, "resolved": dict, "environment": dict, "metrics": dict, "rows": list}


def collect(sweep_dir: str | os.PathLike) -> list[dict]:
    """Every job's result under ``sweep_dir``, in job order, each with all the schema's keys present."""
    sweep_dir = Path(sweep_dir)
    job_dirs = {p.parent for p in sweep_dir.rglob(RESULT_FILE)}
    job_dirs |= {p.parent for p in sweep_dir.rglob(".hydra") if p.is_dir()}
    results = [read_job(job_dir) for job_dir in job_dirs]
    return sorted(results, key=_job_order)


def read_job(job_dir: Path) -> dict:
    """One job's result; a job whose file is absent or unreadable gets a stand-in saying so."""
    path = job_dir / RESULT_FILE
    if not path.exists():
        return _stand_in(job_dir, "missing", "no result.json: the job crashed or was killed before writing it")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return _stand_in(job_dir, "corrupt", f"result.json unreadable: {one_line(str(e))}")
    if not _well_formed(doc):
        return _stand_in(job_dir, "corrupt", f"result.json is not a schema-{SCHEMA_VERSION} result document")
    result = {"status": "ok", "error": None, **{key: kind() for key, kind in SHAPE.items()}, **doc}
    result["job"] = {"num": None, "override_dirname": job_dir.name, **result["job"], "output_dir": str(job_dir)}
    return result


def write_summary(sweep_dir: str | os.PathLike, results: list[dict]) -> list[Path]:
    """Write ``summary.csv``, the plots the rows support and ``summary.md`` into ``sweep_dir``; their paths."""
    sweep_dir = Path(sweep_dir)
    table = make_table(results)
    csv_path = sweep_dir / SUMMARY_CSV
    _write_csv(csv_path, table)
    devices = dict.fromkeys(r["environment"]["device_name"] for r in results if r["environment"].get("device_name"))
    plots = _write_plots(sweep_dir, table, ", ".join(devices) or "unknown device")
    md_path = sweep_dir / SUMMARY_MD
    md_path.write_text(render_markdown(str(sweep_dir), results, table, plots), encoding="utf-8")
    return [csv_path, md_path, *plots]


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mla_runner.sweep.report",
                                     description="Summarise a sweep directory's result.json files.")
    parser.add_argument("sweep_dir", type=Path, help="a multirun directory (hydra.sweep.dir)")
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        parser.error(f"{args.sweep_dir} is not a directory")
    results = collect(args.sweep_dir)
    if not results:
        log.warning("no job directories under %s", args.sweep_dir)
    for path in write_summary(args.sweep_dir, results):
        print(path)
    return 0


def _job_order(result: dict) -> tuple:
    num = result["job"]["num"]
    return (not isinstance(num, int), num if isinstance(num, int) else 0, result["job"]["output_dir"])


def _well_formed(doc: object) -> bool:
    return (isinstance(doc, dict) and doc.get("schema") == SCHEMA_VERSION
            and all(isinstance(doc.get(key, kind()), kind) for key, kind in SHAPE.items())
            and all(isinstance(row, dict) for row in doc.get("rows", [])))


def _stand_in(job_dir: Path, status: str, error: str) -> dict:
    """A result for a job without a usable file, numbered and named from Hydra's record where it has one."""
    job = {"num": None, "override_dirname": job_dir.name, "output_dir": str(job_dir)}
    try:
        recorded = yaml.safe_load((job_dir / ".hydra" / "hydra.yaml").read_text(encoding="utf-8"))["hydra"]["job"]
        job.update(num=recorded.get("num"), override_dirname=recorded.get("override_dirname") or job_dir.name)
    except (OSError, yaml.YAMLError, KeyError, TypeError, AttributeError):
        pass  # no Hydra record: the directory name is all there is
    return {"schema": SCHEMA_VERSION, "status": status, "error": error, "job": job,
            **{key: kind() for key, kind in SHAPE.items() if key != "job"}}


def _write_csv(path: Path, table: Table) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=table.columns, restval="", extrasaction="ignore")
        writer.writeheader()
        writer.writerows(table.lines)


def _write_plots(sweep_dir: Path, table: Table, device: str) -> list[Path]:
    """The plots, or none with a warning: a missing matplotlib or an odd row must not cost the tables."""
    try:
        from mla_runner.sweep.plots import write_plots  # matplotlib is the optional `plot` extra

        return write_plots(sweep_dir, table.lines, device)
    except Exception as e:  # noqa: BLE001 - reported, and the CSV and Markdown are still written
        log.warning("sweep plots skipped: %s: %s", type(e).__name__, one_line(str(e)))
        return []


if __name__ == "__main__":
    sys.exit(main())
