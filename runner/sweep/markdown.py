"""``summary.md``: the sweep as a person reads it.

The CSV keeps every column at full precision; this view keeps what differs. Settings shared by every
job move to one "Common settings" line, a column that repeats another one line for line is
shown once, the figures get units and three significant digits, and the jobs that failed are listed
separately with their one-line error instead of as rows of empty cells.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mla_runner.sweep.table import Table


def _sig3(value: float) -> str:
    """Three significant digits without an exponent: 12,345 / 123 / 12.3 / 1.23 / 0.123."""
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:,.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}" if magnitude >= 1 else f"{value:.3g}"


# Known figures: the column header (with its unit) and how a value is written.
FIGURES: dict[str, tuple[str, Callable[[float], str]]] = {
    "time_us": ("time (µs)", _sig3),
    "step_ms": ("step (ms)", _sig3),
    "floor_us": ("roofline floor (µs)", _sig3),
    "floor_ms": ("roofline floor (ms)", _sig3),
    "metadata_us": ("metadata (µs/step)", _sig3),
    "metadata_wall_us": ("metadata, wall (µs/step)", _sig3),
    "gb_s": ("GB/s", _sig3),
    "tflops": ("TFLOP/s", _sig3),
    "roofline_fraction": ("of roofline", lambda v: f"{100 * v:.1f}%"),
    "weight_gb": ("weights read (GB)", _sig3),
    "kv_gb": ("KV read (GB)", _sig3),
    "copy_gb_s": ("copy ceiling (GB/s)", _sig3),
    "matmul_tflops": ("matmul ceiling (TFLOP/s)", _sig3),
    "tokens_per_s": ("tokens/s", _sig3),
    "seconds": ("time (s)", _sig3),
}
ENV_LIBRARIES = (("torch", "torch"), ("triton", "triton"), ("transformers", "transformers"),
                 ("hydra_core", "hydra-core"), ("cuda", "CUDA"), ("python", "Python"))


def render_markdown(title: str, results: list[dict], table: Table, plots: list[Path]) -> str:
    """The whole summary: counts, environment, common settings, the table, failed jobs, plots."""
    ok_lines = [line for line in table.lines if line["status"] == "ok"]
    shown, common = _split_columns(table, ok_lines)
    counts = Counter(result["status"] for result in results)
    tally = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
    parts = [f"# Sweep summary: {title}", f"{len(results)} jobs" + (f": {tally}" if tally else "")]
    environments = list(dict.fromkeys(_environment(r["environment"]) for r in results if r.get("environment")))
    if environments:
        parts.append("**Environment:** " + "; ".join(environments))
    if common:
        parts.append("**Common settings:** " + ", ".join(f"{k}={v}" for k, v in common.items()))
    if ok_lines:
        parts.append(_table(shown, ok_lines))
    failed = [r for r in results if r["status"] != "ok"]
    if failed:
        parts.append("## Failed jobs\n\n" + "\n".join(_failure(r) for r in failed))
    if plots:
        parts.append("## Plots\n\n" + "\n\n".join(f"![{p.stem}]({p.name})" for p in plots))
    return "\n\n".join(parts) + "\n"


def _split_columns(table: Table, ok_lines: list[dict]) -> tuple[list[str], dict[str, Any]]:
    """The columns worth showing, and the settings common to every line.

    A config column is shown when its value differs between jobs (failed ones included: they were part of
    the grid); a measured column also when it holds figures. A setting equal to an earlier column line for
    line (a row's ``backend`` beside the job's ``attention``) is dropped; figures are all kept.
    """
    configured = [line for line in table.lines if any(line.get(c) is not None for c in table.config_columns)]
    candidates = [(c, configured, False) for c in table.config_columns]
    candidates += [(c, ok_lines, True) for c in table.measure_columns]
    shown: list[str] = []
    common: dict[str, Any] = {}
    seen: list[list[Any]] = []
    for column, basis, measured in candidates:
        values = [line.get(column) for line in basis]
        in_table = [line.get(column) for line in ok_lines]
        figure = measured and (column in FIGURES or any(isinstance(v, float) for v in values))
        if all(v is None for v in values) or (not figure and in_table in seen):
            continue
        if figure or len({repr(v) for v in values}) > 1:
            shown.append(column)
            seen.append(in_table)
        else:
            common[column] = values[0]
    return shown, common


def _table(columns: list[str], lines: list[dict]) -> str:
    header = [FIGURES[c][0] if c in FIGURES else c for c in columns]
    numeric = [all(isinstance(line.get(c), (int, float)) or line.get(c) is None for line in lines) for c in columns]
    rows = ["| " + " | ".join(header) + " |", "| " + " | ".join("---:" if n else "---" for n in numeric) + " |"]
    rows += ["| " + " | ".join(_cell(c, line.get(c)) for c in columns) + " |" for line in lines]
    return "\n".join(rows)


def _cell(column: str, value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return FIGURES[column][1](value) if column in FIGURES else _sig3(value)
    return str(value).replace("|", "\\|")


def _environment(env: dict) -> str:
    device = env.get("device_name") or "unknown device"
    gpus = env.get("gpu_count") or 0
    device += f" × {gpus}" if gpus > 1 else ""
    versions = [f"{label} {env[key]}" for key, label in ENV_LIBRARIES if env.get(key)]
    return ", ".join([device, *versions])


def _failure(result: dict) -> str:
    job = result["job"]
    name = f"job {job['num']}" if job.get("num") is not None else "job"
    where = job.get("override_dirname") or job.get("output_dir") or "?"
    return f"- {name} (`{where}`): **{result['status']}**: {result['error'] or 'no message'}"
