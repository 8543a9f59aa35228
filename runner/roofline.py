"""The two ceilings every benchmark divides by, measured in the same run: copy bandwidth and matmul rate."""
from __future__ import annotations

import functools
import platform
import re
import time
from dataclasses import dataclass

import torch


@dataclass
class Ceilings:
    copy_gbps: float  # device-to-device copy, bytes read + written per second
    matmul_tflops: float  # bf16 matmul on a GPU, fp32 on a CPU
    device: str


@functools.cache
def measure_ceilings(device: torch.device) -> Ceilings:
    """Measured once per device and process: the jobs of a multirun share one measurement."""
    if device.type == "cuda":
        return _measure_gpu(device)
    return _measure_cpu()


def _measure_gpu(device: torch.device) -> Ceilings:
    """A 1 GiB device-to-device copy (GB/s of bytes read + written) and a bf16 8192^3 matmul (TFLOP/s), medians of
    ``triton.testing.do_bench`` (L2 flushed before every call)."""
    with torch.cuda.device(device):
        return Ceilings(_copy_gbps(device), _matmul_tflops(device), torch.cuda.get_device_name(device))


def _copy_gbps(device: torch.device, nbytes: int = 1 << 30) -> float:
    from triton.testing import do_bench

    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    return 2 * nbytes / (ms * 1e-3) / 1e9


def _matmul_tflops(device: torch.device, n: int = 8192) -> float:
    from triton.testing import do_bench

    x = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    y = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    ms = do_bench(lambda: x @ y, warmup=50, rep=300, return_mode="median")
    return 2 * n**3 / (ms * 1e-3) / 1e12


def _measure_cpu(reps: int = 5) -> Ceilings:
    a = torch.empty(1 << 27, dtype=torch.uint8)
    b = torch.empty_like(a)
    copy_s = _best(lambda: b.copy_(a), reps)
    x = torch.randn(1024, 1024)
    mm_s = _best(lambda: x @ x, reps)
    return Ceilings(2 * a.numel() / copy_s / 1e9, 2 * 1024**3 / mm_s / 1e12, platform.processor() or "cpu")


def _best(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def linear_flops_per_token(args) -> float:
    """FLOPs of the linear layers of the whole model (``ModelArgs``, truncated as run) for one token of a prompt: the
    MLA projections with kv_b_proj's up-projection of the token's own latent, the dense MLP or the router, the
    ``num_experts_per_tok`` routed experts and the shared ones; not the embedding or lm_head (one row per request).
    DeepSeek-V3: 0.37 GFLOP of projections and 0.79 of MLP per layer."""
    H, hidden = args.num_attention_heads, args.hidden_size
    q = (hidden * args.q_lora_rank + args.q_lora_rank * H * args.qk_head_dim if args.q_lora_rank
         else hidden * H * args.qk_head_dim)
    mla = (q + hidden * args.kv_cache_dim + args.kv_lora_rank * H * (args.qk_nope_head_dim + args.v_head_dim)
           + H * args.v_head_dim * hidden)
    dense = 3 * hidden * args.intermediate_size
    moe = (hidden * args.n_routed_experts
           + (args.num_experts_per_tok + args.n_shared_experts) * 3 * hidden * args.moe_intermediate_size)
    layers = range(args.num_hidden_layers)
    return 2.0 * sum(mla + (moe if args.is_moe_layer(i) else dense) for i in layers)


def causal_attention_flops(args, prompt_len: int) -> float:
    """FLOPs of causal attention of one prompt over every layer in the non-absorbed form: QK^T at nope + rope and PV
    at v per head for each of the prompt_len * (prompt_len + 1) / 2 query-key pairs."""
    pairs = prompt_len * (prompt_len + 1) / 2
    per_pair = 2 * args.num_attention_heads * (args.qk_head_dim + args.v_head_dim)
    return float(per_pair * pairs * args.num_hidden_layers)


def prefill_flops(args, prompt_lens: list[int]) -> float:
    """The FLOP count of prefilling these prompts from scratch: linear layers plus causal attention."""
    return sum(n * linear_flops_per_token(args) + causal_attention_flops(args, n) for n in prompt_lens)


def touched_weight_bytes(model: torch.nn.Module, batch: int, unique_experts: list[int]) -> int:
    """Weights one decode step reads: everything but the routed experts and the embedding table, plus the
    experts actually routed to and one embedding row per token."""
    total = 0
    # every occurrence: a layer repeated over the same tensors (model.depth) reads them again
    for name, p in model.named_parameters(remove_duplicate=False):
        if "embed_tokens" in name:
            total += batch * p.shape[1] * p.element_size()
        elif ".experts." not in name:
            total += p.numel() * p.element_size()
    experts = [m for name, m in model.named_modules(remove_duplicate=False) if re.search(r"\.experts\.\d+$", name)]
    if experts:  # every MoE layer's experts have the same shapes
        total += sum(p.numel() * p.element_size() for p in experts[0].parameters()) * sum(unique_experts)
    return total
