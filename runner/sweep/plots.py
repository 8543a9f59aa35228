"""PNG plots of a sweep's measurement rows: bandwidth against context, metadata cost against batch.

Drawn with matplotlib's object API (``Figure`` saved through the Agg canvas) rather than pyplot: no global
backend switch, no GUI, and no figures left open in the process that ran the sweep. A plot is drawn only
when the rows carry its fields, so a generation sweep writes none.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import NullLocator

BANDWIDTH_PNG = "bandwidth.png"
METADATA_PNG = "metadata.png"
# A benchmark row names its backend and strategy; a job without rows is described by its config choices.
BACKEND = ("backend", "attention")
STRATEGY = ("strategy", "metadata")
LINESTYLES = ("-", "--", ":", "-.")


def write_plots(out_dir: Path, lines: list[dict], device: str) -> list[Path]:
    """The plots that the successful summary lines support, written into ``out_dir``; their paths."""
    ok = [line for line in lines if line.get("status") == "ok"]
    bandwidth = [line for line in ok if _is_number(line.get("gb_s")) and _is_number(line.get("context"))]
    metadata = [line for line in ok if _is_number(line.get("metadata_us")) and _is_number(line.get("batch"))]
    written = []
    if bandwidth:
        written.append(plot_bandwidth(bandwidth, out_dir / BANDWIDTH_PNG, device))
    if metadata:
        written.append(plot_metadata(metadata, out_dir / METADATA_PNG, device))
    return written


def plot_bandwidth(lines: list[dict], path: Path, device: str) -> Path:
    """Achieved GB/s (top) and % of the roofline (bottom, when rows have it) against context length:
    a column of panels per batch size, a line per backend x strategy."""
    batches = sorted({line.get("batch") for line in lines}, key=lambda b: (b is None, b or 0))
    with_roofline = any(_is_number(line.get("roofline_fraction")) for line in lines)
    fig = Figure(figsize=(max(8.0, 1.5 + 3.5 * len(batches)), 1.5 + 3.0 * (1 + with_roofline)), layout="constrained")
    axes = fig.subplots(1 + with_roofline, len(batches), sharex=True, sharey="row", squeeze=False)
    series = _series(lines, (BACKEND, STRATEGY), ("mode", "model", "dtype", "heads", "q_len", "lengths"))
    for column, batch in enumerate(batches):
        for label, one in series.items():
            points = sorted((p for p in one["lines"] if p.get("batch") == batch), key=lambda p: p["context"])
            contexts = [p["context"] for p in points]
            axes[0, column].plot(contexts, [p["gb_s"] for p in points], label=label, **one["style"])
            if with_roofline:
                known = [p for p in points if _is_number(p.get("roofline_fraction"))]
                axes[1, column].plot([p["context"] for p in known], [100 * p["roofline_fraction"] for p in known],
                                     **one["style"])
        axes[0, column].set_title(f"batch {batch}" if batch is not None else "")
        axes[-1, column].set_xlabel("context (tokens)")
    axes[0, 0].set_ylabel("achieved GB/s")
    if with_roofline:
        axes[1, 0].set_ylabel("% of roofline")
        for ax in axes[1]:
            ax.axhline(100, color="0.5", linestyle="--", linewidth=1)
    for ax in axes.flat:
        _log2_x(ax, [line["context"] for line in lines])
    fig.suptitle(f"MLA decode: achieved bandwidth against context ({device})")
    _legend(fig, axes[0, 0])
    fig.savefig(path, dpi=120)
    return path


def plot_metadata(lines: list[dict], path: Path, device: str) -> Path:
    """Per-step metadata cost against batch size, a line per strategy (and per context etc. where those vary)."""
    fig = Figure(figsize=(7, 5), layout="constrained")
    ax = fig.subplots()
    series = _series(lines, (STRATEGY,), ("backend", "attention", "model", "context", "heads", "q_len", "mode"))
    for label, one in series.items():
        points = sorted(one["lines"], key=lambda p: p["batch"])
        ax.plot([p["batch"] for p in points], [p["metadata_us"] for p in points], label=label, **one["style"])
    if all(line["metadata_us"] > 0 for line in lines):
        ax.set_yscale("log")
    _log2_x(ax, [line["batch"] for line in lines])
    ax.set_xlabel("batch size (requests)")
    ax.set_ylabel("metadata build (µs per step)")
    fig.suptitle(f"Attention metadata cost per decode step ({device})")
    _legend(fig, ax)
    fig.savefig(path, dpi=120)
    return path


def _series(lines: list[dict], fixed: tuple[tuple[str, ...], ...], extra: tuple[str, ...]) -> dict[str, dict]:
    """The plotted series, in first-seen (job) order: label -> {"lines": [...], "style": {...}}.

    A series is one value of the ``fixed`` keys (the first of each alternative that a line has), drawn in
    its own colour, and of each ``extra`` key whose value varies, drawn in its own line style, so no two
    settings share a line and the same backend x strategy keeps its colour throughout.
    """
    varying = [key for key in extra if len({repr(line.get(key)) for line in lines}) > 1]
    groups: dict[tuple[str, str], list[dict]] = {}
    for line in lines:
        base = ", ".join(str(_first(line, keys)) for keys in fixed)
        rest = ", ".join(f"{key}={line.get(key)}" for key in varying)
        groups.setdefault((base, rest), []).append(line)
    bases = list(dict.fromkeys(base for base, _ in groups))
    rests = list(dict.fromkeys(rest for _, rest in groups))
    return {", ".join(filter(None, (base, rest))): {
        "lines": members,
        "style": {"color": f"C{bases.index(base) % 10}", "marker": "o",
                  "linestyle": LINESTYLES[rests.index(rest) % len(LINESTYLES)]},
    } for (base, rest), members in groups.items()}


def _first(line: dict, keys: tuple[str, ...]) -> Any:
    return next((line[key] for key in keys if line.get(key) is not None), "?")


def _log2_x(ax: Axes, values: list[float]) -> None:
    """A base-2 log axis ticked at exactly the measured sizes (1k, 4k, 64k), which are powers of two."""
    ticks = sorted(set(values))
    ax.set_xscale("log", base=2)
    ax.set_xticks(ticks, [_short(v) for v in ticks])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.grid(True, alpha=0.3)


def _short(value: float) -> str:
    return f"{value / 1024:g}k" if value >= 1024 else f"{value:g}"


def _legend(fig: Figure, ax: Axes) -> None:
    """One legend under the panels, in as many columns as its labels fit across the figure."""
    handles, labels = ax.get_legend_handles_labels()
    chars_per_row = 10 * fig.get_figwidth()  # about 10 characters of 10-point text per inch
    columns = max(1, min(len(labels), int(chars_per_row // (max(map(len, labels), default=1) + 6))))
    fig.legend(handles, labels, loc="outside lower center", ncols=columns, frameon=False)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
