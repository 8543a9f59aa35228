"""Runs that survive people, on the command line in subprocesses: interrupts and resume, kill -9, runs started
together, bad prompt lines, config errors before any loading, a damaged cached checkpoint, a failed multirun's exit
code, per-prompt seeds, and flat host memory over 20,000 prompts."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mla_runner.tasks.generate import request_seed

TIMING = ("time_to_first_token_s", "latency_s")  # the only fields that differ between runs of the same prompts
# Enough work that a signal arrives mid-run: 16 prompts decoded one at a time, 48 tokens each.
SLOW = ["dtype=float32", "max_batch_size=1", "task.max_tokens=48", "task.temperature=1.0", "task.seed=7",
        "progress=false"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The user's cache moved into a temp dir: the embedded checkpoint is generated fresh there once."""
    return {**os.environ, "XDG_CACHE_HOME": str(tmp_path_factory.mktemp("cache"))}


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    """16 prompts, every other one greedy (its own temperature 0), the rest sampled with per-prompt seeds."""
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    rows = [{"prompt_token_ids": [5 + i, 7, 9 + i % 3]} | ({"temperature": 0} if i % 2 else {}) for i in range(16)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def cli(args: list[str], env: dict, cwd: Path, **pipes) -> subprocess.Popen:
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, **pipes}
    return subprocess.Popen([sys.executable, "-m", "mla_runner", *args], cwd=cwd, env=env, text=True, **pipes)


def run(args: list[str], env: dict, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mla_runner", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines(keepends=True) if path.exists() else []


def by_index(path: Path) -> dict[int, dict]:
    """The completions file's rows by prompt index, without their timings; every line whole, every index once."""
    text = path.read_text()
    assert text.endswith("\n"), "a line cut short"
    rows = [json.loads(line) for line in text.splitlines()]
    out = {r["index"]: {k: v for k, v in r.items() if k not in TIMING} for r in rows}
    assert len(out) == len(rows), "an index written twice"
    return out


def wait_for_lines(path: Path, n: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while len(lines(path)) < n:
        assert proc.poll() is None, f"the run ended before {n} lines: {proc.communicate()}"
        assert time.monotonic() < deadline, "no progress"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def uninterrupted(env, prompts, tmp_path_factory) -> dict[int, dict]:
    out = tmp_path_factory.mktemp("whole") / "run"
    proc = run([f"hydra.run.dir={out}", f"task.prompts={prompts}", *SLOW], env, out.parent)
    assert proc.returncode == 0, proc.stderr
    rows = by_index(out / "completions.jsonl")
    assert sorted(rows) == list(range(16))
    return rows


@pytest.mark.parametrize("signum,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGKILL, -9)])
def test_a_stopped_run_resumes_to_the_same_file(env, prompts, uninterrupted, tmp_path, signum, code):
    """Stopped mid-run, the run leaves whole lines (a signal: at a step boundary, with one line on stderr and an
    "interrupted" result.json; kill -9: wherever it was); resumed into the same directory, it runs only the prompts
    without a line and the file ends equal to an uninterrupted run's, greedy and seeded-sampled lines alike."""
    out = tmp_path / "run"
    proc = cli([f"hydra.run.dir={out}", f"task.prompts={prompts}", *SLOW], env, tmp_path)
    wait_for_lines(out / "completions.jsonl", 3, proc)
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == code, stderr
    assert "Traceback" not in stderr
    partial = by_index(out / "completions.jsonl")
    assert 3 <= len(partial) < 16
    if signum != signal.SIGKILL:
        said = [line for line in stderr.splitlines() if line.startswith("interrupted:")]
        assert len(said) == 1 and f"task.resume=true hydra.run.dir={out}" in said[0], stderr
        result = json.loads((out / "result.json").read_text())
        assert result["status"] == "interrupted" and result["metrics"]["finished"] == len(partial)
    again = run([f"hydra.run.dir={out}", f"task.prompts={prompts}", *SLOW], env, tmp_path)
    assert again.returncode == 1 and "task.resume=true" in again.stderr  # never written over unasked
    assert by_index(out / "completions.jsonl") == partial
    resumed = run([f"hydra.run.dir={out}", f"task.prompts={prompts}", *SLOW, "task.resume=true"], env, tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert by_index(out / "completions.jsonl") == uninterrupted
    assert json.loads((out / "result.json").read_text())["metrics"]["requests"] == 16 - len(partial)


def test_resume_refuses_other_settings(env, prompts, tmp_path):
    out = tmp_path / "run"
    assert run([f"hydra.run.dir={out}", f"task.prompts={prompts}", "task.max_tokens=2", "progress=false"], env,
               tmp_path).returncode == 0
    proc = run([f"hydra.run.dir={out}", f"task.prompts={prompts}", "task.max_tokens=3", "progress=false",
                "task.resume=true"], env, tmp_path)
    assert proc.returncode == 1 and "task.max_tokens=3 differs from the earlier run's 2" in proc.stderr


def test_runs_started_together_get_their_own_directories_and_share_none(env, prompts, tmp_path):
    both = [cli(["task.max_tokens=2", "progress=false"], env, tmp_path) for _ in range(2)]
    for proc in both:
        assert proc.wait(timeout=300) == 0, proc.communicate()
    assert len(list(tmp_path.glob("outputs/*/*/completions.jsonl"))) == 2
    # a directory named on the command line: one live run holds it, another refuses in one line
    out = tmp_path / "shared"
    first = cli([f"hydra.run.dir={out}", f"task.prompts={prompts}", *SLOW], env, tmp_path)
    wait_for_lines(out / "completions.jsonl", 1, first)
    second = run([f"hydra.run.dir={out}", f"task.prompts={prompts}", *SLOW], env, tmp_path)
    assert second.returncode == 1
    assert [line for line in second.stderr.splitlines() if line] == [
        f"error: {out} is in use by another run (pid {first.pid}): choose another hydra.run.dir"]
    assert first.wait(timeout=300) == 0
    assert len(by_index(out / "completions.jsonl")) == 16


def test_every_bad_prompt_line_is_reported_and_the_good_ones_run(env, tmp_path):
    path = tmp_path / "prompts.jsonl"
    rows = [b'\xef\xbb\xbf{"prompt_token_ids": [5, 6, 7], "max_tokens": 2}',  # a byte-order mark
            b"",  # a blank line
            b'{"prompt_token_ids": [8, 9]',
            b'{"prompt_token_ids": [3], "colour": "red"}',
            b'{"prompt": 5}',
            b'{"prompt_token_ids": [4, 4], "max_tokens": "7"}',
            b'{"prompt": "caf\xe9"}',  # Latin-1, not UTF-8
            b'{"prompt": "Hello there", "max_tokens": 3}']
    path.write_bytes(b"\r\n".join(rows) + b"\r\n")  # CRLF line ends
    out = tmp_path / "run"
    proc = run([f"hydra.run.dir={out}", f"task.prompts={path}", "progress=false"], env, tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = by_index(out / "completions.jsonl")
    assert sorted(rows) == list(range(7))
    assert len(rows[0]["token_ids"]) == 2 and len(rows[6]["token_ids"]) <= 3
    want = {1: (3, "not valid JSON"), 2: (4, "unknown field 'colour'"), 3: (5, "field 'prompt' must be a string"),
            4: (6, 'field \'max_tokens\' must be an integer or null, got a string "7"'), 5: (7, "not valid UTF-8")}
    for index, (line, needle) in want.items():
        assert rows[index]["line"] == line and f"{path}:{line}: " in rows[index]["error"], rows[index]
        assert needle in rows[index]["error"], rows[index]
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n \n")
    proc = run([f"hydra.run.dir={tmp_path / 'empty'}", f"task.prompts={empty}"], env, tmp_path)
    assert proc.returncode == 1 and proc.stderr.strip() == f"error: {empty}: no prompts (the file is empty)"


@pytest.mark.parametrize("args,needle", [
    (["page_size=3"], "page_size=3 is not valid: it must be a power of two"),
    (["+foo=1"], "foo is not a setting of this run"),
    (["+task.colour=red"], "task.colour is not a setting of this run"),
    (["attention=flashmla", "page_size=16"], "attention=flashmla needs page_size=64 (here 16)"),
])
def test_config_errors_come_before_any_loading(env, tmp_path, args, needle):
    proc = run([f"hydra.run.dir={tmp_path / 'run'}", *args], env, tmp_path)
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: ") and needle in errors[0], proc.stderr
    assert not (tmp_path / "run").exists()  # stopped before Hydra made the run directory, before any loading


def test_a_damaged_cached_checkpoint_is_written_again(env, tmp_path):
    cache = tmp_path / "cache"
    args = ["task.max_tokens=2", "progress=false", f"model.cache_dir={cache}"]
    assert run([f"hydra.run.dir={tmp_path / 'a'}", *args], env, tmp_path).returncode == 0
    (ckpt,) = cache.iterdir()
    shard = sorted(ckpt.glob("*.safetensors"))[0]
    good = shard.read_bytes()
    shard.write_bytes(good[: len(good) // 2])
    proc = run([f"hydra.run.dir={tmp_path / 'b'}", *args], env, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "is damaged" in (tmp_path / "b" / "runner.log").read_text()
    assert shard.read_bytes() == good
    assert by_index(tmp_path / "a" / "completions.jsonl") == by_index(tmp_path / "b" / "completions.jsonl")


def test_a_multirun_with_a_failed_job_exits_non_zero_after_its_summary(env, tmp_path):
    sweep = tmp_path / "sweep"
    proc = run(["-m", f"hydra.sweep.dir={sweep}", "attention=torch,flashmla", "task.max_tokens=2", "progress=false"],
               env, tmp_path)
    assert proc.returncode == 1
    summary = (sweep / "summary.md").read_text()
    assert "1 error, 1 ok" in summary and "attention=flashmla" in summary


def test_a_preset_that_disagrees_with_the_checkpoint_is_an_error(env, tmp_path, dsv3_ckpt):
    proc = run([f"hydra.run.dir={tmp_path / 'run'}", "model=kimi_k2", f"model.path={dsv3_ckpt}"], env, tmp_path)
    assert proc.returncode == 1
    assert f"model=kimi_k2 runs kimi_k2 checkpoints, {dsv3_ckpt} holds a deepseek_v3 one" in proc.stderr


def test_each_prompt_samples_with_its_own_seed_batched_or_not(env, tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt_token_ids": [5, 6, 7]}) + "\n" for _ in range(4)))
    runs = []
    for batch in (8, 1):
        out = tmp_path / f"b{batch}"
        proc = run([f"hydra.run.dir={out}", f"task.prompts={path}", "task.temperature=1.0", "task.seed=3",
                    "task.max_tokens=12", f"max_batch_size={batch}", "progress=false"], env, tmp_path)
        assert proc.returncode == 0, proc.stderr
        runs.append(by_index(out / "completions.jsonl"))
    assert runs[0] == runs[1]  # batched equals one at a time
    assert len({tuple(r["token_ids"]) for r in runs[0].values()}) == 4  # the same prompt, four streams
    assert len({request_seed(3, i) for i in range(1000)}) == 1000 and request_seed(3, 5) == request_seed(3, 5)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the RSS from /proc")
def test_thousands_of_prompts_in_flat_host_memory(env, tmp_path):
    """The host memory of a run of 6,000 short prompts at 10% of its completions and at its end: what the run keeps
    per finished request (nothing but its line in the output file) must not add up."""
    n = 6_000
    path = tmp_path / "prompts.txt"
    path.write_text("".join(f"prompt number {i} says\n" for i in range(n)))
    out, log = tmp_path / "run", (tmp_path / "stderr").open("w")
    proc = cli([f"hydra.run.dir={out}", f"task.prompts={path}", "task.max_tokens=1", "max_batch_size=64",
                "progress=false"], env, tmp_path, stdout=subprocess.DEVNULL, stderr=log)
    samples = []  # (lines written, RSS)
    while proc.poll() is None:
        try:
            samples.append((len(lines(out / "completions.jsonl")), rss_mb(proc.pid)))
        except (OSError, AssertionError):  # the process ended between the poll and the read
            break
        time.sleep(0.05)
    assert proc.wait() == 0, (tmp_path / "stderr").read_text()
    at_10 = next(rss for done, rss in samples if done >= n // 10)
    at_end = samples[-1][1]
    assert samples[-1][0] >= 0.9 * n and len(by_index(out / "completions.jsonl")) == n
    assert at_end - at_10 < 64, (at_10, at_end)
