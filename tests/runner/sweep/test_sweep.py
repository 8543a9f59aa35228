"""Sweep results and reports: result.json from a RunConfig, and the multirun summary built from hand-made
result files (a failed job, a corrupt file and a missing one among them), checked against the inputs."""
from __future__ import annotations

import csv
import json
import logging
import platform
from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra.utils import get_class
from omegaconf import OmegaConf

from mla_runner.compose import CONF_DIR, compose_config
from mla_runner.config import register_configs
from mla_runner.environment import environment
from mla_runner.sweep.callback import SweepSummary
from mla_runner.sweep.report import collect, main, write_summary
from mla_runner.sweep.result import KEY_ORDER, make_result, write_result

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ENV = {"device_name": "Test GPU", "gpu_count": 1, "cuda": "12.4", "python": "3.11.7", "torch": "2.13.0",
       "triton": "3.9.0", "transformers": "5.0.0", "hydra_core": "1.3.8"}
BENCH = {"task": "bench", "model": "tiny_deepseek_v3", "dtype": "bfloat16", "device": "cuda", "batch": 4}


def bench_rows(backend: str, strategy: str, scale: float) -> list[dict]:
    return [{"backend": backend, "strategy": strategy, "heads": 128, "batch": 4, "context": context, "q_len": 1,
             "time_us": 10.123456 * i * scale, "gb_s": 1234.5678901 * i * scale, "tflops": 0.4567 * i,
             "floor_us": 8.5 * i, "roofline_fraction": 0.8312345 / i / scale}
            for i, context in enumerate((1024, 4096), start=1)]


METADATA_ROWS = [{"backend": "torch", "strategy": strategy, "batch": batch, "context": 2048, "metadata_us": us}
                 for strategy, base in (("persistent", 3.25), ("per_step", 41.5))
                 for batch, us in ((1, base), (8, base * 1.5), (64, base * 4.125))]


def result_doc(num: int, config: dict, rows=(), metrics=None, error=None) -> dict:
    return {"schema": 1, "status": "error" if error else "ok", "error": error,
            "job": {"num": num, "override_dirname": f"job{num}", "output_dir": f"/elsewhere/{num}"},
            "config": config, "environment": ENV, "metrics": metrics or {}, "rows": list(rows)}


def write_job(sweep: Path, num: int, content: dict | str | None) -> Path:
    """A job directory as Hydra leaves it (.hydra/hydra.yaml), with a result.json unless content is None."""
    job_dir = sweep / f"{num}_job"
    (job_dir / ".hydra").mkdir(parents=True)
    (job_dir / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(
        {"hydra": {"job": {"num": num, "override_dirname": f"attention=x{num}"}}}))
    if content is not None:
        text = content if isinstance(content, str) else json.dumps(content)
        (job_dir / "result.json").write_text(text)
    return job_dir


JOBS = {
    0: result_doc(0, {**BENCH, "attention": "torch", "metadata": "persistent", "mode": "kernel"},
                  bench_rows("torch", "persistent", 1.0)),
    1: result_doc(1, {**BENCH, "attention": "torch", "metadata": "per_step", "mode": "kernel"},
                  bench_rows("torch", "per_step", 0.9)),
    2: result_doc(2, {**BENCH, "attention": "triton", "metadata": "persistent", "mode": "kernel"},
                  bench_rows("triton", "persistent", 1.5)),
    3: result_doc(3, {**BENCH, "attention": "triton", "metadata": "per_step", "mode": "kernel"},
                  error="CUDA out of memory while allocating the KV cache"),
    4: result_doc(4, {**BENCH, "attention": "torch", "metadata": "persistent", "mode": "metadata"},
                  METADATA_ROWS),
    5: '{"schema": 1, "status": "ok", "rows": [',
    6: None,
}
CSV_LINES = 3 * 2 + 1 + len(METADATA_ROWS) + 1 + 1  # three bench jobs x 2 rows, the error, metadata rows,
                                                    # the corrupt file and the missing one


def make_sweep(path: Path) -> Path:
    for num, content in JOBS.items():
        write_job(path, num, content)
    (path / "multirun.yaml").write_text("hydra: {}\n")
    return path


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    return make_sweep(tmp_path)


@pytest.fixture(scope="module")
def summarized(tmp_path_factory) -> tuple[Path, list[Path]]:
    """The hand-made sweep, summarised once (drawing the plots is the slow part)."""
    sweep = make_sweep(tmp_path_factory.mktemp("sweep"))
    return sweep, write_summary(sweep, collect(sweep))


def generation_sweep(path: Path) -> Path:
    for num, (attention, tps) in enumerate((("torch", 120.25), ("triton", 98.5))):
        config = {"task": "generate", "model": "tiny_deepseek_v3", "attention": attention, "max_tokens": 8}
        write_job(path, num, result_doc(num, config, metrics={"tokens_per_s": tps, "requests": 4}))
    return path


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


# ---- result.json ----

def test_make_result_flattens_the_run_config():
    cfg = compose_config(["attention=triton", "metadata=per_step", "task.max_tokens=3", "task.seed=7"])
    job = {"num": 2, "override_dirname": "attention=triton,metadata=per_step", "output_dir": "/out/2"}
    result = make_result(cfg, job, {"tokens_per_s": 12.5}, None, None)
    assert (result["schema"], result["status"], result["error"], result["rows"]) == (1, "ok", None, [])
    assert result["job"] == job and result["metrics"] == {"tokens_per_s": 12.5}
    config = result["config"]
    assert tuple(config)[:len(KEY_ORDER)] == KEY_ORDER
    assert (config["task"], config["model"], config["attention"], config["metadata"]) == (
        "generate", "tiny_deepseek_v3", "triton", "per_step")
    assert config["max_tokens"] == 3 and config["task.seed"] == 7 and config["seed"] == 0  # task.seed kept apart
    assert config["metadata.num_kv_splits"] == 4 and config["model.path"] is None
    assert all(not isinstance(v, (dict, list)) for v in config.values())


def test_make_result_of_a_failed_job(tmp_path):
    result = make_result(None, {"num": None, "override_dirname": "", "output_dir": tmp_path}, None,
                         None, "model.path=/x does not exist:\n  check the path")
    assert result["status"] == "error" and result["error"] == "model.path=/x does not exist: check the path"
    assert result["config"] == {} and result["metrics"] == {} and result["job"]["output_dir"] == str(tmp_path)


def test_write_result_round_trips(tmp_path):
    result = make_result(compose_config([]), {"num": 0}, {"seconds": 0.25}, [{"batch": 1, "time_us": 3.5}], None)
    write_result(tmp_path / "result.json", result)
    assert json.loads((tmp_path / "result.json").read_text()) == result
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_environment_names_the_machine_and_versions():
    env = environment()
    assert set(env) == {"device_name", "gpu_count", "cuda", "python", "torch", "triton", "transformers",
                        "hydra_core"}
    assert env["python"] == platform.python_version() and env["torch"] == torch.__version__
    assert env["cuda"] == torch.version.cuda and env["hydra_core"] == "1.3.8"
    assert isinstance(env["device_name"], str) and env["device_name"]
    assert env["gpu_count"] == (torch.cuda.device_count() if torch.cuda.is_available() else 0)


# ---- the summary ----

def test_collect_reads_every_job_and_names_the_broken_ones(sweep):
    results = collect(sweep)
    assert [r["job"]["num"] for r in results] == list(range(7))
    assert [r["status"] for r in results] == ["ok", "ok", "ok", "error", "ok", "corrupt", "missing"]
    assert results[5]["error"].startswith("result.json unreadable") and "result.json" in results[6]["error"]
    assert results[6]["job"]["override_dirname"] == "attention=x6"  # from Hydra's record of the job
    assert results[0]["job"]["output_dir"] == str(sweep / "0_job")  # where the file is now


def test_summary_csv_has_a_line_per_row_with_the_input_numbers(summarized):
    sweep, paths = summarized
    assert [p.name for p in paths] == ["summary.csv", "summary.md", "bandwidth.png", "metadata.png"]
    lines = read_csv(sweep / "summary.csv")
    assert len(lines) == CSV_LINES
    columns = list(lines[0])
    assert columns[:2] == ["job", "status"] and columns[2:6] == ["task", "model", "attention", "metadata"]
    assert {"error", "batch", "context", "gb_s", "roofline_fraction", "metadata_us"} <= set(columns)
    by_job = {}
    for line in lines:
        by_job.setdefault(line["job"], []).append(line)
    for num in (0, 1, 2, 4):
        expected = JOBS[num]["rows"]
        got = by_job[str(num)]
        assert len(got) == len(expected)
        for line, row in zip(got, expected):
            assert line["status"] == "ok" and line["attention"] == JOBS[num]["config"]["attention"]
            for key, value in row.items():
                assert (float(line[key]) if isinstance(value, float) else type(value)(line[key])) == value, key
    (failed,) = by_job["3"]
    assert failed["status"] == "error" and failed["error"] == JOBS[3]["error"] and failed["gb_s"] == ""
    assert failed["attention"] == "triton" and failed["metadata"] == "per_step"
    assert [by_job["5"][0]["status"], by_job["6"][0]["status"]] == ["corrupt", "missing"]


def test_summary_md_is_a_readable_table_with_the_failures(summarized):
    sweep, _ = summarized
    md = (sweep / "summary.md").read_text()
    assert "7 jobs: 1 corrupt, 1 error, 1 missing, 4 ok" in md
    assert "Test GPU, torch 2.13.0, triton 3.9.0" in md
    assert "task=bench" in md and "model=tiny_deepseek_v3" in md  # common settings, not columns
    table = [line for line in md.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in table[0].strip("|").split("|")]
    assert header[:2] == ["attention", "metadata"] and "mode" in header and "strategy" in header
    assert {"GB/s", "of roofline", "time (µs)", "metadata (µs/step)", "context"} <= set(header)
    assert "backend" not in header  # it repeats attention line for line
    assert len(table) == 2 + 3 * 2 + len(METADATA_ROWS)  # header, rule, the successful lines only
    assert "| 1,235 |" in table[2] and "| 83.1% |" in table[2]  # gb_s 1234.57, roofline 0.8312
    assert "- job 3 (`job3`): **error**: CUDA out of memory while allocating the KV cache" in md
    assert "- job 5 (`attention=x5`): **corrupt**: result.json unreadable" in md
    assert "- job 6 (`attention=x6`): **missing**" in md
    assert "](bandwidth.png)" in md and "](metadata.png)" in md


def test_plots_are_pngs(summarized):
    sweep, _ = summarized
    bandwidth, metadata = png_size(sweep / "bandwidth.png"), png_size(sweep / "metadata.png")
    assert bandwidth[0] > 300 and bandwidth[1] > 300 and metadata[0] > 300 and metadata[1] > 300


def test_a_generation_sweep_has_one_line_per_job_and_no_plots(tmp_path):
    paths = write_summary(generation_sweep(tmp_path), collect(tmp_path))
    assert [p.name for p in paths] == ["summary.csv", "summary.md"]
    lines = read_csv(tmp_path / "summary.csv")
    assert [(line["attention"], float(line["tokens_per_s"])) for line in lines] == [("torch", 120.25),
                                                                                    ("triton", 98.5)]
    md = (tmp_path / "summary.md").read_text()
    assert "| attention | tokens/s |" in md and "| torch | 120 |" in md and "requests=4" in md
    assert not list(tmp_path.glob("*.png"))


# ---- the callback, the script, the presets ----

def test_callback_writes_the_summary(tmp_path):
    SweepSummary().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(generation_sweep(tmp_path))}}}))
    assert len(read_csv(tmp_path / "summary.csv")) == 2 and "2 jobs: 2 ok" in (tmp_path / "summary.md").read_text()


@pytest.mark.parametrize("config", [{}, {"hydra": {"sweep": {"dir": "/does/not/exist"}}}])
def test_callback_never_raises(config, caplog):
    with caplog.at_level(logging.WARNING):
        SweepSummary().on_multirun_end(OmegaConf.create(config))
    assert len(caplog.records) == 1 and "sweep summary not written" in caplog.records[0].getMessage()


def test_report_script_reaggregates(tmp_path, capsys):
    assert main([str(generation_sweep(tmp_path))]) == 0
    assert capsys.readouterr().out.split() == [str(tmp_path / "summary.csv"), str(tmp_path / "summary.md")]
    assert len(read_csv(tmp_path / "summary.csv")) == 2


def sweep_params(preset: str) -> dict:
    return yaml.safe_load((CONF_DIR / "sweep" / f"{preset}.yaml").read_text())["hydra"]["sweeper"]["params"]


def test_backends_preset_composes_and_the_callback_is_registered():
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["+sweep=backends"], return_hydra_config=True)
    assert dict(cfg.hydra.sweeper.params) == {"attention": "torch,triton", "metadata": "persistent,per_step"}
    assert list(cfg.hydra.job.config.override_dirname.exclude_keys) == ["sweep"]
    assert get_class(cfg.hydra.callbacks.sweep_summary._target_) is SweepSummary


@pytest.mark.parametrize("preset,mode,params", [
    ("decode_grid", "kernel", {"attention": "torch,triton", "metadata": "persistent,per_step",
                               "task.batch": "1,4,16,64", "task.context": "1024,4096,16384,65536"}),
    ("metadata_grid", "metadata", {"metadata": "persistent,per_step", "task.batch": "1,2,4,8,16,32,64,128,256",
                                   "task.context": "2048,32768"}),
])
def test_bench_presets_select_the_bench_task_and_sweep_batch_and_context(preset, mode, params):
    text = (CONF_DIR / "sweep" / f"{preset}.yaml").read_text()
    assert text.startswith("# @package _global_\n")
    doc = yaml.safe_load(text)
    assert doc["defaults"] == [{"override /task": "bench"}] and doc["task"] == {"mode": mode}
    assert {k: str(v) for k, v in sweep_params(preset).items()} == params
