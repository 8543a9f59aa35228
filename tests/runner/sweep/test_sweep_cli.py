"""A CPU multirun end to end: every job writes result.json and the callback summarises them in the sweep dir,
whether the grid comes from plain overrides or from the `backends` preset."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest
import yaml

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


def multirun(args: list[str], env: dict, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mla_runner", "-m", *args, "progress=false"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_job_directories_are_job_numbers_whatever_the_overrides(env, tmp_path):
    """A swept path and 20 overrides: no job directory is named after them (none too long, none nested)."""
    prompts = []
    for i in range(2):
        path = tmp_path / "deep" / f"prompts set {i}" / "p.jsonl"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps({"prompt_token_ids": [5 + i, 6]}) + "\n")
        prompts.append(str(path))
    long = [f"task.max_tokens={2}", "task.temperature=0.0", "task.top_p=1.0", "task.top_k=0", "task.chat=false",
            "seed=0", "dtype=float32", "device=cpu", "max_batch_size=4", "max_model_len=256", "page_size=16",
            "kv_cache_memory_fraction=0.5", "weights=auto", "metadata.num_kv_splits=2", "model.seed=0",
            "model.trust_remote_code=false", "task.output=completions.jsonl", "parallel.moe=ep", "attention=torch"]
    sweep = tmp_path / "sweep"
    proc = multirun([f"hydra.sweep.dir={sweep}", f"task.prompts={','.join(prompts)}", *long], env, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]
    for job in ("0", "1"):
        result = json.loads((sweep / job / "result.json").read_text())
        assert result["status"] == "ok" and result["config"]["prompts"] == prompts[int(job)]
        overrides = yaml.safe_load((sweep / job / ".hydra" / "overrides.yaml").read_text())
        assert "task.prompts=" + prompts[int(job)].replace(" ", "\\ ") in overrides  # (Hydra escapes the spaces)


def test_an_optuna_sweep_optimizes_the_runs_objective(env, tmp_path):
    sweep = tmp_path / "sweep"
    proc = multirun([f"hydra.sweep.dir={sweep}", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=3",
                     "hydra.sweeper.direction=minimize", "objective=generated_tokens", "task.max_tokens=range(2,6)"],
                    env, tmp_path)
    assert proc.returncode == 0, proc.stderr
    results = [json.loads(p.read_text()) for p in sweep.glob("*/result.json")]
    assert len(results) == 3 and all(r["status"] == "ok" for r in results)
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["best_value"] == min(r["metrics"]["generated_tokens"] for r in results)


def test_the_submitit_launcher_runs_jobs_in_their_own_processes(env, tmp_path):
    sweep = tmp_path / "sweep"
    proc = multirun([f"hydra.sweep.dir={sweep}", "hydra/launcher=submitit_local", "metadata=persistent,per_step",
                     "attention=triton", "task.max_tokens=2"], env, tmp_path)
    assert proc.returncode == 0, proc.stderr
    results = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/result.json"))]
    assert [r["config"]["metadata"] for r in results] == ["persistent", "per_step"]
    assert all(r["status"] == "ok" for r in results)
    assert "2 jobs: 2 ok" in (sweep / "summary.md").read_text()  # the callback ran in the launching process
