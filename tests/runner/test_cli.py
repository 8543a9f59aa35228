"""The command line in a subprocess: the default run, an override, a two-job multirun and bad input."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The user's cache moved into a temp dir, so the embedded checkpoints are generated fresh once."""
    cache = tmp_path_factory.mktemp("cache")
    return {**os.environ, "XDG_CACHE_HOME": str(cache)}


def run_cli(args: list[str], env: dict, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mla_runner", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_default_run(env, tmp_path):
    out = tmp_path / "run"
    proc = run_cli([f"hydra.run.dir={out}"], env, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "tokens/s" in proc.stdout
    rows = read_jsonl(out / "completions.jsonl")
    assert len(rows) == 4 and all(r["finish_reason"] in ("stop", "length") for r in rows)
    assert all(len(r["token_ids"]) >= 1 and r["text"] is not None for r in rows)
    resolved = (out / "resolved_config.yaml").read_text()
    assert "name: tiny_deepseek_v3" in resolved and "strategy: persistent" in resolved


def test_override_and_prompts_file(env, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    too_long = list(range(2, 300))
    prompts.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "Hello there", "max_tokens": 3},
        {"prompt_token_ids": too_long},
        {"prompt_token_ids": [5, 6, 7], "max_tokens": 2},
    ]) + "\n")
    out = tmp_path / "run"
    proc = run_cli([f"hydra.run.dir={out}", "model=tiny_kimi_k2", "metadata=per_step", "dtype=float32",
                    "max_model_len=256", f"task.prompts={prompts}", "task.max_tokens=4"], env, tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = {r["index"]: r for r in read_jsonl(out / "completions.jsonl")}
    assert sorted(rows) == [0, 1, 2]
    assert "max_model_len=256" in rows[1]["error"]
    assert len(rows[0]["token_ids"]) <= 3 and len(rows[2]["token_ids"]) <= 2
    assert "name: tiny_kimi_k2" in (out / "resolved_config.yaml").read_text()


def test_multirun_two_jobs(env, tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_cli(["-m", f"hydra.sweep.dir={sweep}", "metadata=persistent,per_step", "task.max_tokens=2",
                    "progress=false"], env, tmp_path)
    assert proc.returncode == 0, proc.stderr
    jobs = sorted(p.parent for p in sweep.glob("*/completions.jsonl"))
    assert len(jobs) == 2
    strategies = {(job / "resolved_config.yaml").read_text().split("strategy: ")[1].split()[0] for job in jobs}
    assert strategies == {"persistent", "per_step"}


@pytest.mark.parametrize("args,needle", [
    (["dtype=bf16"], "dtype"),
    (["max_batch_size=abc"], "max_batch_size"),
    (["attention=flash"], "attention=flash"),
    (["no_such_setting=1"], "no_such_setting"),
    (["model.path=/does/not/exist"], "/does/not/exist"),
    (["model=deepseek_v3"], "model.path"),
    (["attention=flashmla", "device=cpu"], "attention=flashmla needs"),
    (["attention=aiter"], "attention=aiter"),
])
def test_bad_input_fails_with_one_line(env, tmp_path, args, needle):
    proc = run_cli([f"hydra.run.dir={tmp_path / 'run'}", *args], env, tmp_path)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and needle in errors[0], proc.stderr


def test_a_run_says_what_it_resolved_and_measured(env, tmp_path):
    """result.json's resolved settings (no "auto" left), generate's latency figures, the job log holding the setup
    and the summary, and profile=true's trace of a few steps."""
    out = tmp_path / "run"
    proc = run_cli([f"hydra.run.dir={out}", "task.max_tokens=8", "profile=true", "progress=false"], env, tmp_path)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((out / "result.json").read_text())
    resolved, metrics = result["resolved"], result["metrics"]
    assert "auto" not in resolved.values() and resolved["weights"] in ("fp8", resolved["dtype"])
    assert resolved["kv_tokens"] == resolved["kv_pages"] * resolved["page_size"] == resolved["kv_pages"] * 64
    assert resolved["cuda_graphs"] == bool(resolved["graph_batch_sizes"])
    assert resolved["piecewise_cuda_graphs"] is False  # off by default, and graphs only on a GPU
    for name in ("ttft_s", "tpot_s"):
        assert 0 < metrics[f"{name}_median"] <= metrics[f"{name}_p99"]
    assert metrics["tokens_per_s"] == pytest.approx(metrics["generated_tokens"] / metrics["seconds"], rel=0.01)
    assert metrics["prompt_tokens"] == sum(r["prompt_tokens"] for r in read_jsonl(out / "completions.jsonl"))
    log = (out / "runner.log").read_text()
    assert f"{resolved['kv_pages']} pages of 64" in log and "CUDA graphs" in log and "time to first token" in log
    assert "has random weights, so its text is noise" in log
    events = json.loads((out / "trace.json").read_text())["traceEvents"]
    assert any(e.get("name", "").startswith(("decode of", "prefill of")) for e in events)


def test_mtp_drafting_reports_its_acceptance(env, tmp_path):
    """speculative=mtp from the command line: result.json's metrics carry the acceptance figures (as ngram's do),
    consistent with one another, and the log says them."""
    out = tmp_path / "run"
    proc = run_cli([f"hydra.run.dir={out}", "speculative=mtp", "speculative.num_tokens=2", "attention=torch",
                    "task.max_tokens=6", "progress=false"], env, tmp_path)
    assert proc.returncode == 0, proc.stderr
    m = json.loads((out / "result.json").read_text())["metrics"]
    assert m["num_verify_steps"] > 0 and m["num_draft_tokens"] >= m["num_verify_steps"]
    assert m["mean_acceptance_length"] == pytest.approx(1 + m["num_accepted_tokens"] / m["num_verify_steps"], abs=1e-4)
    assert m["acceptance_rate"] == pytest.approx(m["num_accepted_tokens"] / m["num_draft_tokens"], abs=1e-4)
    assert "acceptance_rate_2" in m and "acceptance_rate_3" not in m
    assert "speculative=mtp: mean acceptance length" in (out / "runner.log").read_text()


def test_an_objective_that_is_not_a_figure_is_an_error(env, tmp_path):
    proc = run_cli([f"hydra.run.dir={tmp_path / 'run'}", "objective=speed", "task.max_tokens=2", "progress=false"],
                   env, tmp_path)
    assert proc.returncode == 1
    assert "error: objective=speed is not a figure of this run: choose one of requests," in proc.stderr
