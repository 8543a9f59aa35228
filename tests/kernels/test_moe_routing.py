"""Fused router (mla_runner.kernels.moe_routing) against mla_runner.models.moe.Gate (its torch ops) and
routing_reference.

Without a CUDA GPU the kernel runs under the Triton interpreter; with one, the same tests run on it and the
``gpu`` tests add real widths (hidden 7168), a no-host-sync check and CUDA-graph replay with new logits.

What "equal" means: ids identical, in the same order, on every token whose routing is not tied; a token counts
as tied when, in the torch reference, two of the values that decide its ids (the top k+1 masked biased scores,
or the group scores) are within TIE_EPS: there the kernel's sigmoid, a few ulp away from torch's, may
legitimately pick the other one. Weights of untied tokens: relative error below WEIGHT_RTOL (the interpreter's
numpy sigmoid vs torch's: 1e-6; on a GPU Triton's exp is ex2.approx and its division div.full, a few ulp each).
"""
from types import SimpleNamespace

import pytest
import torch

from mla_runner.kernels.cuda_graph import capture
from mla_runner.kernels.moe_routing import fused_routing, routing_reference
from mla_runner.models.moe import Gate

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
WEIGHT_RTOL = {"cpu": 1e-6, "cuda": 2e-6}[DEVICE]
TIE_EPS = 1e-6

# name: (E, n_group, topk_group, k, normalize, scale)
CONFIGS = {
    "deepseek_v3": (256, 8, 4, 8, True, 2.5),
    "kimi_k2": (384, 1, 1, 8, True, 2.827),
    "tiny_deepseek_v3": (8, 2, 1, 2, True, 2.5),
    "tiny_kimi_k2": (12, 1, 1, 2, True, 2.827),
    "odd_groups": (18, 6, 3, 5, False, 1.0),  # 6 groups of 3: both tile dims padded; no normalization
}


def make_gate(name, hidden=64, seed=0, device=DEVICE, dtype=torch.bfloat16):
    E, n_group, topk_group, k, normalize, scale = CONFIGS[name]
    args = SimpleNamespace(num_experts_per_tok=k, n_group=n_group, topk_group=topk_group, norm_topk_prob=normalize,
                           routed_scaling_factor=scale, n_routed_experts=E, hidden_size=hidden)
    gate = Gate(args)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        gate.weight.copy_(torch.randn(E, hidden, generator=g) * hidden ** -0.5)
        gate.e_score_correction_bias.copy_(torch.randn(E, generator=g) * 0.3)  # big enough to change choices
    gate.weight.data = gate.weight.data.to(dtype)  # as loaded: the router in the model dtype, the bias fp32
    return gate.to(device).requires_grad_(False)


def tied_tokens(logits, bias, k, n_group, topk_group, eps=TIE_EPS):
    """[T] bool: the torch routing of the token depends on a difference smaller than eps (module doc)."""
    biased = logits.sigmoid() + bias
    tied = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
    if topk_group < n_group:
        grouped = biased.unflatten(-1, (n_group, -1))
        group_scores = grouped.topk(2, dim=-1).values.sum(-1).sort(dim=-1, descending=True).values
        tied |= (group_scores[:, :-1] - group_scores[:, 1:] < eps).any(dim=1)
        keep = group_scores[:, topk_group - 1: topk_group]
        gs = grouped.topk(2, dim=-1).values.sum(-1)
        biased = grouped.masked_fill((gs < keep)[..., None], float("-inf")).flatten(1)
    top = biased.topk(min(k + 1, biased.shape[1]), dim=-1).values
    tied |= (top[:, :-1] - top[:, 1:] < eps).any(dim=1)
    return tied


def assert_same_routing(w, ids, ref_w, ref_ids, logits, bias, k, n_group, topk_group):
    assert ids.shape == ref_ids.shape and w.shape == ref_w.shape and w.dtype == torch.float32
    tied = tied_tokens(logits, bias, k, n_group, topk_group)
    same = (ids.long() == ref_ids).all(dim=1)
    assert (same | tied).all(), f"ids differ on untied tokens {(~same & ~tied).nonzero().flatten().tolist()}"
    err = ((w - ref_w).abs() / ref_w.abs().clamp_min(1e-30))[same]
    assert err.numel() == 0 or err.max() <= WEIGHT_RTOL, f"weight rel err {err.max():.2e} > {WEIGHT_RTOL:.0e}"
    return tied


@pytest.mark.parametrize("name,T", [("deepseek_v3", 1), ("deepseek_v3", 13), ("kimi_k2", 1), ("kimi_k2", 7),
                                    ("tiny_deepseek_v3", 33), ("tiny_kimi_k2", 5), ("odd_groups", 11)])
def test_matches_gate(name, T):
    """The kernel on Gate's own logits equals Gate.forward's torch path."""
    gate = make_gate(name, seed=T)
    gate.fused = False
    x = torch.randn(T, gate.weight.shape[1], generator=torch.Generator().manual_seed(100 + T)).to(gate.weight)
    ref_w, ref_ids = gate(x)
    logits = x.float() @ gate.weight.float().t()
    bias = gate.e_score_correction_bias
    w, ids = fused_routing(logits, bias, gate.top_k, gate.n_group, gate.topk_group, gate.normalize, gate.scale)
    assert ids.dtype == torch.int64
    tied = assert_same_routing(w, ids, ref_w, ref_ids, logits, bias, gate.top_k, gate.n_group, gate.topk_group)
    if DEVICE == "cpu":
        assert not tied.any()  # these seeds have no near-ties: every id is compared
    if gate.normalize:
        torch.testing.assert_close(w.sum(1), torch.full((T,), gate.scale, device=DEVICE), rtol=1e-6, atol=0)


def test_reference_is_gate():
    """routing_reference is Gate's math, bit for bit (the benchmark's torch side)."""
    gate = make_gate("deepseek_v3", device="cpu")
    gate.fused = False
    x = torch.randn(9, gate.weight.shape[1], generator=torch.Generator().manual_seed(1)).to(gate.weight)
    ref_w, ref_ids = gate(x)
    w, ids = routing_reference(x.float() @ gate.weight.float().t(), gate.e_score_correction_bias, gate.top_k,
                               gate.n_group, gate.topk_group, gate.normalize, gate.scale)
    assert torch.equal(ids, ref_ids) and torch.equal(w, ref_w)


def test_tie_rule_lowest_index():
    """Exact ties: groups and experts go to the lower index; output sorted by score, ties by id."""
    E, n_group, topk_group, k = 16, 4, 2, 3
    logits = torch.zeros(3, E, device=DEVICE)  # token 0: all scores 0.5 (everything tied)
    logits[1, 12:] = 1.0  # token 1: group 3 wins; its 4 experts tie; then group 0 (lowest of the tied rest)
    logits[2, [5, 9]] = 2.0  # token 2: groups 1 and 2 tie with the same top-2 sum; experts 5 and 9 tie at the top
    w, ids = fused_routing(logits, None, k, n_group, topk_group, normalize=False, scale=1.0)
    assert ids.tolist() == [[0, 1, 2], [12, 13, 14], [5, 9, 4]]
    s = torch.tensor([0.0, 1.0, 2.0]).sigmoid()
    expected = torch.tensor([[s[0]] * 3, [s[1]] * 3, [s[2], s[2], s[0]]], device=DEVICE)
    torch.testing.assert_close(w, expected, rtol=WEIGHT_RTOL, atol=0)


def test_nan_and_inf_logits_give_distinct_valid_ids():
    """Degenerate logits still give k distinct experts in [0, E) (keys are unique), finite where scores are."""
    E, n_group, topk_group, k, normalize, scale = CONFIGS["deepseek_v3"]
    logits = torch.full((3, E), float("-inf"), device=DEVICE)  # token 0: every score 0 (all tied)
    logits[1, ::3] = float("nan")  # token 1: NaN scores
    logits[2] = float("inf")  # token 2: every score 1
    w, ids = fused_routing(logits, None, k, n_group, topk_group, normalize, scale)
    assert ids.min() >= 0 and ids.max() < E
    assert all(len(set(row)) == k for row in ids.tolist())
    assert ids[0].tolist() == list(range(k)) and ids[2].tolist() == list(range(k))
    torch.testing.assert_close(w[2], torch.full((k,), scale / k, device=DEVICE), rtol=WEIGHT_RTOL, atol=0)


def test_out_buffers_int32_and_strides():
    """Given outputs are written in place and returned (int32 ids too); row-strided logits and outputs."""
    E, n_group, topk_group, k, normalize, scale = CONFIGS["tiny_deepseek_v3"]
    g = torch.Generator().manual_seed(3)
    big = torch.randn(6, 2 * E, generator=g).to(DEVICE)
    logits = big[:, :E]  # row stride 2E
    bias = (torch.randn(E, generator=g) * 0.3).to(DEVICE)
    out_w = torch.full((6, k + 3), float("nan"), device=DEVICE)[:, :k]
    out_ids = torch.full((6, k), -7, dtype=torch.int32, device=DEVICE)
    rw, rids = fused_routing(logits, bias, k, n_group, topk_group, normalize, scale, out_w, out_ids)
    assert rw is out_w and rids is out_ids
    ref_w, ref_ids = routing_reference(logits, bias, k, n_group, topk_group, normalize, scale)
    assert_same_routing(out_w, out_ids, ref_w, ref_ids, logits, bias, k, n_group, topk_group)


@pytest.mark.parametrize("kwargs,match", [
    (dict(logits=torch.zeros(2, 8, dtype=torch.float16)), "float32"),
    (dict(bias=torch.zeros(7)), "bias"),
    (dict(n_group=3), "groups"),
    (dict(top_k=5), "top_k"),  # 1 kept group of 4 experts
    (dict(out_ids=torch.zeros(2, 2, dtype=torch.int16)), "out_ids"),
    (dict(out_weights=torch.zeros(2, 3)), "out_weights"),
    (dict(logits=torch.zeros(2, 8), n_group=8, topk_group=4), "2 experts per group"),
])
def test_bad_inputs(kwargs, match):
    args = dict(logits=torch.zeros(2, 8), bias=torch.zeros(8), top_k=2, n_group=2, topk_group=1)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        fused_routing(**args)


# ---------------------------------------------------------------- GPU: real widths, no sync, CUDA graphs
@pytest.mark.parametrize("name", ["deepseek_v3", "kimi_k2"])
@pytest.mark.parametrize("T", [1, 16, 128])
@pytest.mark.gpu
def test_gpu_gate_fused_vs_torch(name, T):
    """Gate.forward on CUDA (fused) against its torch path, hidden 7168 bf16: the same logits (one cuBLAS GEMM)."""
    gate = make_gate(name, hidden=7168, seed=T)
    x = torch.randn(T, 7168, device="cuda", generator=torch.Generator("cuda").manual_seed(T)).bfloat16()
    w, ids = gate(x)
    gate.fused = False
    ref_w, ref_ids = gate(x)
    logits = x.float() @ gate.weight.float().t()
    tied = assert_same_routing(w, ids, ref_w, ref_ids, logits, gate.e_score_correction_bias, gate.top_k,
                               gate.n_group, gate.topk_group)
    assert tied.float().mean() < 0.1


@pytest.mark.gpu
def test_gpu_no_host_sync():
    """torch raises on any synchronizing call while the mode is 'error'."""
    gate = make_gate("deepseek_v3", hidden=7168)
    x = torch.randn(16, 7168, device="cuda").bfloat16()
    logits = x.float() @ gate.weight.float().t()
    out_w = torch.empty(16, 8, device="cuda")
    out_ids = torch.empty(16, 8, dtype=torch.int32, device="cuda")
    gate(x)  # compile first
    fused_routing(logits, gate.e_score_correction_bias, 8, 8, 4, True, 2.5, out_w, out_ids)
    torch.cuda.set_sync_debug_mode("error")
    try:
        gate(x)
        fused_routing(logits, gate.e_score_correction_bias, 8, 8, 4, True, 2.5, out_w, out_ids)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("name", ["deepseek_v3", "kimi_k2"])
@pytest.mark.parametrize("T", [1, 64])
@pytest.mark.gpu
def test_gpu_cuda_graph_replay(name, T):
    """Capture fused_routing (given outputs) and a whole Gate.forward, refill the inputs, replay == eager."""
    E, n_group, topk_group, k, normalize, scale = CONFIGS[name]
    gate = make_gate(name, hidden=7168)
    g = torch.Generator("cuda").manual_seed(T)
    logits = torch.randn(T, E, device="cuda", generator=g)
    x = torch.randn(T, 7168, device="cuda", generator=g).bfloat16()
    out_w = torch.empty(T, k, device="cuda")
    out_ids = torch.empty(T, k, dtype=torch.int64, device="cuda")
    bias = gate.e_score_correction_bias
    graph, _ = capture(lambda: fused_routing(logits, bias, k, n_group, topk_group, normalize, scale, out_w, out_ids),
                       warmup=2)
    gate_graph, (gw, gids) = capture(lambda: gate(x), warmup=2)
    for _ in range(3):
        logits.copy_(torch.randn(T, E, device="cuda", generator=g) * 2)
        x.copy_(torch.randn(T, 7168, device="cuda", generator=g))
        out_w.fill_(float("nan"))
        out_ids.fill_(-1)
        graph.replay()
        gate_graph.replay()
        ew, eids = fused_routing(logits, bias, k, n_group, topk_group, normalize, scale)
        assert torch.equal(out_ids, eids) and torch.equal(out_w, ew)
        ew, eids = gate(x)
        assert torch.equal(gids, eids) and torch.equal(gw, ew)
