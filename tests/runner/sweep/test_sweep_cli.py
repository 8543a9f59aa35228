"""A CPU multirun end to end: every job writes result.json and the callback summarises them in the sweep dir,
whether the grid comes from plain overrides or from the `backends` preset."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest

GRID = {("torch", "persistent"), ("torch", "per_step"), ("triton", "persistent"), ("triton", "per_step")}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The user's cache moved into a temp dir, so the embedded checkpoint is generated fresh once."""
    return {**os.environ, "XDG_CACHE_HOME": str(tmp_path_factory.mktemp("cache"))}


KERNEL_BENCH = ["task=bench", "task.mode=kernel", "task.batch=2", "task.context=40,80", "task.iters=2",
                "page_size=16"]


@pytest.mark.parametrize("grid,task,metric", [
    (["attention=torch,triton", "metadata=persistent,per_step", "task.max_tokens=2"], "generate", "tokens_per_s"),
    (["+sweep=backends", *KERNEL_BENCH], "bench", "gb_s"),
], ids=["overrides-generate", "preset-bench"])
def test_multirun_writes_results_and_one_summary(env, tmp_path, grid, task, metric):
    sweep = tmp_path / "sweep"
    proc = subprocess.run([sys.executable, "-m", "mla_runner", "-m", f"hydra.sweep.dir={sweep}", *grid,
                           "progress=false"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    results = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/result.json"))]
    jobs = 4 if task == "generate" else 8
    assert len(results) == jobs
    assert {(r["config"]["attention"], r["config"]["metadata"]) for r in results} == GRID
    assert all(r["status"] == "ok" and r["config"]["task"] == task and r["job"]["num"] in range(jobs)
               for r in results)
    assert not any("sweep=" in r["job"]["override_dirname"] for r in results)

    with open(sweep / "summary.csv", newline="") as f:
        lines = list(csv.DictReader(f))
    assert len(lines) == jobs and {(line["attention"], line["metadata"]) for line in lines} == GRID
    by_job = {int(line["job"]): line for line in lines}
    for r in results:
        assert float(by_job[r["job"]["num"]][metric]) == pytest.approx(r["metrics"][metric])
    md = (sweep / "summary.md").read_text()
    assert f"{jobs} jobs: {jobs} ok" in md and "| attention | metadata |" in md
    if task == "bench":  # measurement rows with GB/s against context: the bandwidth plot
        assert (sweep / "bandwidth.png").read_bytes().startswith(b"\x89PNG")
