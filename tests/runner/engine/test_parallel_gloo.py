"""Two CPU processes over gloo, as torchrun would start them: the same greedy tokens as one process and logits
equal up to fp32 summation order, for both flavours and both MoE layouts, and with MTP speculative decoding (k = 2:
every rank drafts and verifies alike); and ``torchrun -m mla_runner`` itself. With two GPUs, the same over NCCL with
the decode, verify and drafting steps as CUDA-graph replays."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mla_runner import LLM, SamplingParams
from mla_runner.engine.distributed import Launch
from mla_runner.models.loader import load_model
from mla_testing import INTERPRETER
from mla_testing.oracle import PagedRunner

PROMPTS = ([5], [7, 3, 9, 11, 2, 40, 41, 8, 6], list(range(20, 60)))
MAX_TOKENS = 5
# Relative max logit error allowed against one process, fp32: the all-reduces only change summation order.
LOGIT_RTOL = 1e-5
CASES = [("dsv3", "ep", "torch", None), ("dsv3", "tp", "torch", None), ("kimi", "ep", "torch", None),
         ("kimi", "tp", "torch", None), ("dsv3", "ep", "triton", None), ("dsv3", "tp", "triton", "mtp")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _llm(ckpt: str, device: str = "cpu", **overrides) -> LLM:
    return LLM(ckpt, dtype="float32", device=device, page_size=16, max_model_len=128, progress=False,
               tensor_parallel_size=Launch.from_env().world, **overrides)


def _generate(llm: LLM, ignore_eos: bool = True) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=ignore_eos)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def _logits(model) -> torch.Tensor:
    """Prefill of two prompts, then one decode step of each, through our paged runner."""
    runner = PagedRunner(model)
    first = runner.step({0: PROMPTS[1], 1: PROMPTS[2]})
    second = runner.step({0: [3], 1: [4]})
    return torch.cat([*first.values(), *second.values()])


def _worker(rank: int, world: int, port: int, ckpts: dict[str, str], out_file: str, device: str = "cpu") -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    results, full = {}, {}
    for flavour, moe, attention, method in CASES:
        spec = {"speculative_config": {"method": method, "num_speculative_tokens": 2}} if method else {}
        llm = _llm(ckpts[flavour], device, attention=attention, **{"parallel.moe": moe}, **spec)
        if device == "cuda":
            assert llm.engine.runner.use_graphs == (attention == "triton")
        tokens = _generate(llm)
        if flavour not in full:
            model = load_model(ckpts[flavour], dtype=torch.float32, progress=False, device=llm.engine.runner.device)
            full[flavour] = _logits(model)
        ref = full[flavour]
        err = float((_logits(llm.engine.runner.model) - ref).abs().max() / ref.abs().max())
        results["/".join((flavour, moe, attention, str(method)))] = {"tokens": tokens, "logit_err": err}
    if rank == 0:
        Path(out_file).write_text(json.dumps(results))
    dist.destroy_process_group()
    # Leave without interpreter finalization: after all the work, gloo's native threads sometimes abort the
    # process while it tears down ("terminate called without an active exception", no Python frame; about 1
    # run in 4 with torch 2.13 on 2 cores), which mp.spawn would report as a failure.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# Triton on a CPU runs under its interpreter, which is on only on machines without a GPU.
CPU_TRITON = "triton" if INTERPRETER else "torch"


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu(count=2))])
def test_two_ranks_match_one_process(dsv3_ckpt: Path, kimi_ckpt: Path, tmp_path: Path, device: str):
    """cpu: gloo; cuda: NCCL, and triton + persistent decode steps replay CUDA graphs with the collectives."""
    if device == "cpu" and CPU_TRITON != "triton":
        pytest.skip("the CPU run needs the Triton interpreter, which is off on a GPU machine")
    ckpts = {"dsv3": str(dsv3_ckpt), "kimi": str(kimi_ckpt)}
    out = tmp_path / "results.json"
    mp.spawn(_worker, args=(2, _free_port(), ckpts, str(out), device), nprocs=2, join=True)
    results = json.loads(out.read_text())
    single = {flavour: _generate(_llm(ckpt, device)) for flavour, ckpt in ckpts.items()}
    for flavour, moe, attention, method in CASES:
        got = results["/".join((flavour, moe, attention, str(method)))]
        assert got["tokens"] == single[flavour], (flavour, moe, attention, method)
        assert got["logit_err"] < LOGIT_RTOL, (flavour, moe, attention, method, got["logit_err"])


def test_torchrun_runs_the_cli_and_rank0_alone_writes(dsv3_ckpt: Path, tmp_path: Path):
    if CPU_TRITON != "triton":
        pytest.skip("the CPU processes need the Triton interpreter, which is off on a GPU machine")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt_token_ids": p}) + "\n" for p in PROMPTS))
    work, out = tmp_path / "cwd", tmp_path / "cwd" / "run"
    work.mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "mla_runner",
         f"model.path={dsv3_ckpt}", "device=cpu", "dtype=float32", "attention=triton", "parallel.moe=tp",
         "parallel.size=2", f"task.prompts={prompts}", f"task.max_tokens={MAX_TOKENS}", "page_size=16",
         "max_model_len=128", "progress=false", f"hydra.run.dir={out}"],
        cwd=work, env=os.environ, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    expected = _generate(_llm(str(dsv3_ckpt)), ignore_eos=False)
    assert [r["token_ids"] for r in sorted(rows, key=lambda r: r["index"])] == expected
    assert sorted(p.name for p in work.iterdir()) == ["run"]  # rank 1 left nothing behind
    assert proc.stdout.count(" requests (0 errors)") == 1  # and printed nothing


def test_srun_tasks_are_the_ranks(dsv3_ckpt: Path, tmp_path: Path):
    """Two tasks of an srun step (as Hydra's submitit SLURM launcher starts them): their ranks from SLURM's variables,
    the rendezvous on the step's first node; the same completions as one process, written by task 0 alone."""
    if CPU_TRITON != "triton":
        pytest.skip("the CPU processes need the Triton interpreter, which is off on a GPU machine")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt_token_ids": p}) + "\n" for p in PROMPTS))
    out = tmp_path / "run"
    slurm = dict(SLURM_STEP_NUM_TASKS="2", SLURM_JOB_ID="4242", SLURM_STEP_NODELIST="localhost",
                 MASTER_PORT=str(_free_port()))
    tasks = [subprocess.Popen(
        [sys.executable, "-m", "mla_runner", f"model.path={dsv3_ckpt}", "device=cpu", "dtype=float32",
         "parallel.size=2", f"task.prompts={prompts}", f"task.max_tokens={MAX_TOKENS}", "page_size=16",
         "max_model_len=128", "progress=false", f"hydra.run.dir={out}"], cwd=tmp_path, text=True,
        env={**os.environ, **slurm, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE) for r in range(2)]
    for task in tasks:
        _, err = task.communicate(timeout=300)
        assert task.returncode == 0, err[-3000:]
    rows = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    assert [r["token_ids"] for r in sorted(rows, key=lambda r: r["index"])] == _generate(_llm(str(dsv3_ckpt)),
                                                                                          ignore_eos=False)


def test_the_launch_is_read_from_torchrun_or_slurm():
    assert Launch.from_env({}) == Launch()
    assert Launch.from_env({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"}) == Launch(4, 3, 1)
    slurm = {"SLURM_STEP_NUM_TASKS": "8", "SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "123456",
             "SLURM_STEP_NODELIST": "gpu[03-05,09],cpu1"}
    assert Launch.from_env(slurm) == Launch(8, 5, 1, ("gpu03", 20000 + 123456 % 20000))
    # a batch script's own environment (no srun step) is one process, whatever the allocation's size
    assert Launch.from_env({"SLURM_NTASKS": "8", "SLURM_PROCID": "0"}) == Launch()
    assert Launch.from_env({**slurm, "WORLD_SIZE": "2", "RANK": "1"}) == Launch(2, 1, 0)  # torchrun inside srun
