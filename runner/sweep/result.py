"""``result.json``: what every job (single run or multirun) leaves in its output directory.

One flat, versioned document per job, so that a sweep can be summarised by reading files alone, long after
the process that measured them is gone, and so that a job that failed still says which configuration it was
and why::

    {"schema": 1,
     "status": "ok" | "error" | "interrupted",  # "error" when the job raised, "interrupted" when a signal
                                         # stopped it; the summary also uses "missing" / "corrupt" for jobs
                                         # whose file is absent or unreadable
     "error": null | "one-line message",
     "job": {"num": int | null,          # the multirun job number; null in a single run
             "override_dirname": str,    # the job's command-line overrides, as Hydra names its directory
             "output_dir": str},
     "config": {"task": str, "model": str, "attention": str, "metadata": str, "dtype": str, "device": str,
                "seed": int, ..., "model.path": str | null, "metadata.num_kv_splits": int | null, ...,
                "max_tokens": int, ...},  # see flat_config
     "resolved": {"device": str, "dtype": str, ...},  # what the job's "auto" settings came to (device, dtype,
                                         # weights, KV pages, CUDA graphs, ...: the task's engine says)
     "environment": {...},               # runner.environment.environment()
     "metrics": {"tokens_per_s": float, ...},     # the task's summary scalars
     "rows": [{"backend": str, "strategy": str, "batch": int, "context": int, "time_us": float,
               "gb_s": float, "roofline_fraction": float, "metadata_us": float, ...}, ...]}
                                         # one flat dict per measurement (benchmarks); [] for other tasks

``config`` keys are the Hydra override keys that reproduce the job: a group appears under its own name
with the option chosen (``attention: triton``), run-level fields by name, other groups' fields dotted
(``model.path``), and the task's own fields by their bare name (``batch``, ``context``: the names the
benchmark rows use too), prefixed ``task.`` only where that name is already a run-level field (``task.seed``).
"""
from __future__ import annotations

import json
import os
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any, Optional

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

from mla_runner.environment import environment

SCHEMA_VERSION = 1
RESULT_FILE = "result.json"

# The field of each group's config that holds the option chosen on the command line (``metadata=per_step``).
CHOICE_FIELDS = {"model": "name", "attention": "name", "metadata": "strategy", "task": "name", "speculative": "method"}
# The keys a reader looks for first, in this order; the rest follow in declaration order.
KEY_ORDER = ("task", "model", "attention", "metadata", "dtype", "device")


def make_result(run_cfg: Any, job_info: dict, metrics: Optional[dict], rows: Optional[list[dict]],
                error: Optional[str], status: Optional[str] = None, resolved: Optional[dict] = None) -> dict:
    """The result document for one job (see the module docstring).

    ``run_cfg`` is the job's ``RunConfig``, or None when the config itself failed to compose or validate;
    ``job_info`` holds ``num``, ``override_dirname`` and ``output_dir`` (``hydra_job_info()`` in a Hydra
    job); ``error`` is set when the job failed or was interrupted and is reduced to one line; ``status``
    defaults to "error" with an error, else "ok".
    """
    return {
        "schema": SCHEMA_VERSION,
        "status": status or ("error" if error else "ok"),
        "error": one_line(error) if error else None,
        "job": {"num": job_info.get("num"), "override_dirname": str(job_info.get("override_dirname", "")),
                "output_dir": str(job_info.get("output_dir", ""))},
        "config": flat_config(run_cfg) if run_cfg is not None else {},
        "resolved": dict(resolved or {}),
        "environment": environment(),
        "metrics": dict(metrics or {}),
        "rows": [dict(row) for row in rows or []],
    }


def write_result(path: str | os.PathLike, result: dict) -> None:
    """Write ``result`` as JSON, atomically, so a job killed mid-write leaves no half file for the summary."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2, default=_to_json) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def hydra_job_info() -> dict:
    """``job_info`` for the current Hydra job: its number (multirun only), override dirname and output dir."""
    hydra_cfg = HydraConfig.get()
    return {
        "num": hydra_cfg.job.num if hydra_cfg.mode == RunMode.MULTIRUN else None,
        "override_dirname": hydra_cfg.job.override_dirname,
        "output_dir": hydra_cfg.runtime.output_dir,
    }


def flat_config(run_cfg: Any) -> dict:
    """The run config as one flat dict of scalars keyed by override name (see the module docstring)."""
    config: dict[str, Any] = {}
    groups: dict[str, Any] = {}
    for f in fields(run_cfg):
        value = getattr(run_cfg, f.name)
        if is_dataclass(value):
            groups[f.name] = value
            config[f.name] = getattr(value, CHOICE_FIELDS.get(f.name, "name"), None)
        elif _is_scalar(value):
            config[f.name] = value
    for group, node in groups.items():
        choice_field = CHOICE_FIELDS.get(group, "name")
        for f in fields(node):
            value = getattr(node, f.name)
            if f.name == choice_field or not _is_scalar(value):
                continue
            bare = group == "task" and f.name not in config
            config[f.name if bare else f"{group}.{f.name}"] = value
    first = {key: config[key] for key in KEY_ORDER if key in config}
    return {**first, **{key: value for key, value in config.items() if key not in first}}


def one_line(message: str) -> str:
    return " ".join(str(message).split())


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def _to_json(value: Any) -> Any:
    """Numbers that arrive as numpy or torch scalars, and paths."""
    if hasattr(value, "item"):
        return value.item()
    return str(value)
