"""A CPU multirun end to end: every job writes result.json and the callback summarises them in the sweep dir,
whether the grid comes from plain overrides or from the `backends` preset."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
GRID = {("torch", "persistent"), ("torch", "per_step"), ("triton", "persistent"), ("triton", "per_step")}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The user's cache moved into a temp dir, so the embedded checkpoint is generated fresh once."""
    return {**os.environ, "XDG_CACHE_HOME": str(tmp_path_factory.mktemp("cache")), "PYTHONPATH": str(REPO)}


@pytest.mark.parametrize("grid", [["attention=torch,triton", "metadata=persistent,per_step"], ["+sweep=backends"]],
                         ids=["overrides", "preset"])
def test_multirun_writes_results_and_one_summary(env, tmp_path, grid):
    sweep = tmp_path / "sweep"
    proc = subprocess.run([sys.executable, "-m", "runner", "-m", f"hydra.sweep.dir={sweep}", *grid,
                           "task.max_tokens=2", "progress=false"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    results = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/result.json"))]
    assert len(results) == 4
    assert {(r["config"]["attention"], r["config"]["metadata"]) for r in results} == GRID
    assert all(r["status"] == "ok" and r["job"]["num"] in range(4) for r in results)
    assert not any("sweep=" in r["job"]["override_dirname"] for r in results)

    with open(sweep / "summary.csv", newline="") as f:
        lines = list(csv.DictReader(f))
    assert len(lines) == 4 and {(line["attention"], line["metadata"]) for line in lines} == GRID
    by_job = {int(line["job"]): line for line in lines}
    for r in results:
        assert float(by_job[r["job"]["num"]]["tokens_per_s"]) == r["metrics"]["tokens_per_s"]
    md = (sweep / "summary.md").read_text()
    assert "4 jobs: 4 ok" in md and "| attention | metadata |" in md
