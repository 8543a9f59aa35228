"""Tensor / expert parallelism without processes: shard ranges, the split table, FP8 shards on and off
128-blocks, the sharded loader (every rank's tensors are slices of the single-process model's) and the
config errors. The multi-process runs (gloo) are in test_parallel_gloo.py."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from mla_runner import LLM
from mla_runner.errors import ConfigError
from mla_runner.kernels.fp8_block import dequantize_fp8_block, quantize_fp8_block
from mla_runner.models.fp8_linear import FP8Linear
from mla_runner.models.loader import load_model
from mla_runner.models.parallel import (
    Parallel,
    foreign_expert,
    fp8_aligned,
    layout_problem,
    read_fp8_shard,
    read_shard,
    shard_dim,
)
from mla_runner.models.presets import TINY_DEEPSEEK_V3_CONFIG
from mla_runner.models.tiny import make_tiny_checkpoint

# Dims on 128 multiples at TP2: q_b_proj 2 heads x 64 rows, o_proj 2 x 64 columns, MLPs 128 channels per rank;
# kv_b_proj (2 x 112 rows per rank) still cuts blocks.
ALIGNED_CONFIG = {
    **TINY_DEEPSEEK_V3_CONFIG, "hidden_size": 256, "num_attention_heads": 4, "num_key_value_heads": 4,
    "q_lora_rank": 128, "qk_nope_head_dim": 48, "qk_rope_head_dim": 16, "v_head_dim": 64,
    "intermediate_size": 256, "moe_intermediate_size": 256, "n_routed_experts": 4, "num_hidden_layers": 2,
    "num_nextn_predict_layers": 0,
}


def test_shares_and_the_split_table():
    assert [Parallel(r, 4).span(16) for r in range(4)] == [(0, 4), (4, 8), (8, 12), (12, 16)]
    ep, tp = Parallel(1, 2, "ep"), Parallel(1, 2, "tp")
    assert list(ep.owned_experts(8)) == [4, 5, 6, 7] and list(tp.owned_experts(8)) == list(range(8))
    layer = "model.layers.1."
    cases = {"self_attn.q_b_proj.weight": 0, "self_attn.kv_b_proj.weight": 0, "self_attn.o_proj.weight_scale_inv": 1,
             "self_attn.q_a_proj.weight": None, "self_attn.kv_a_proj_with_mqa.weight": None,
             "input_layernorm.weight": None, "mlp.gate.weight": None, "mlp.gate.e_score_correction_bias": None,
             "mlp.shared_experts.up_proj.weight": 0, "mlp.shared_experts.down_proj.weight": 1}
    for name, dim in cases.items():
        assert shard_dim(layer + name, ep) == dim, name
        assert shard_dim(layer + name, Parallel()) is None
    assert shard_dim("model.embed_tokens.weight", ep) == 0 and shard_dim("lm_head.weight", ep) == 0
    expert = layer + "mlp.experts.2.down_proj.weight"
    assert shard_dim(expert, ep) is None and shard_dim(expert, tp) == 1
    assert foreign_expert(expert, ep, 8) and not foreign_expert(expert, tp, 8)
    assert not foreign_expert(layer + "mlp.experts.5.down_proj.weight", ep, 8)


def test_layout_problems_name_the_size():
    args = SimpleNamespace(num_attention_heads=8, intermediate_size=136, vocab_size=512, moe_intermediate_size=48,
                           n_shared_experts=1, n_routed_experts=12)
    assert layout_problem(args, Parallel(0, 4, "ep")) is None and layout_problem(args, Parallel(0, 4, "tp")) is None
    assert layout_problem(args, Parallel(0, 3, "ep")) == "num_attention_heads=8 is not divisible by the world size 3"
    assert "n_routed_experts=12 is not" in layout_problem(SimpleNamespace(**{**vars(args), "num_attention_heads": 16,
                                                                           "intermediate_size": 16 * 8}),
                                                         Parallel(0, 8, "ep"))
    odd = SimpleNamespace(**{**vars(args), "moe_intermediate_size": 50, "n_shared_experts": 2})
    assert layout_problem(odd, Parallel(0, 4, "ep")) is None  # shared 100 channels: 25 per rank
    assert layout_problem(odd, Parallel(0, 4, "tp")) == "moe_intermediate_size=50 is not divisible by the world size 4"


@pytest.mark.parametrize("world,dim", [(3, 0), (2, 0), (3, 1), (2, 1)])
def test_fp8_shards_equal_slices_of_the_dequantized_weight(world, dim):
    """[384, 384] in 128-blocks: a third is whole blocks (kept as FP8 with its scales), a half cuts a block
    (dequantized from the covering blocks, then cropped)."""
    w = torch.randn(384, 384, generator=torch.Generator().manual_seed(0))
    q, scale = quantize_fp8_block(w)
    full = dequantize_fp8_block(q, scale)
    for rank in range(world):
        par = Parallel(rank, world)
        wq, s, crop = read_fp8_shard(q, scale, q.shape, dim, par, (128, 128))
        want = read_shard(full, full.shape, dim, par)
        assert (crop is None) == (world == 3)
        got = dequantize_fp8_block(wq, s)
        torch.testing.assert_close(got if crop is None else got[crop], want, rtol=0, atol=0)


def _assert_slices(local: torch.nn.Module, full: torch.nn.Module, par: Parallel) -> int:
    """Every tensor of ``local`` equals this rank's slice of the same tensor of ``full``; returns how many."""
    full_sd = full.state_dict()
    for name, t in local.state_dict().items():
        ref = full_sd[name]
        dim = shard_dim(name, par)
        want = read_shard(ref, ref.shape, dim, par)
        assert t.dtype == want.dtype and t.shape == want.shape, name
        assert torch.equal(t.float(), want.float()), name
    return len(local.state_dict())


@pytest.mark.parametrize("moe", ["ep", "tp"])
def test_sharded_load_holds_slices_of_the_full_model(dsv3_ckpt: Path, dsv3_model, moe):
    """Tiny dims cut FP8 blocks everywhere: each shard is dequantized from its covering blocks."""
    sizes = []
    for rank in range(2):
        par = Parallel(rank, 2, moe)
        local = load_model(dsv3_ckpt, dtype=torch.float32, progress=False, par=par)
        sizes.append(_assert_slices(local, dsv3_model, par))
        experts = local.model.layers[1].mlp.experts
        assert len(experts) == (4 if moe == "ep" else 8)
        assert local.model.layers[1].self_attn.n_heads == 4 and local.lm_head.weight.shape[0] == 256
    assert sizes[0] == sizes[1]


@pytest.fixture(scope="module")
def aligned_ckpt(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("aligned"), ALIGNED_CONFIG, seed=3)


@pytest.mark.parametrize("moe", ["ep", "tp"])
def test_fp8_shards_on_block_boundaries_stay_fp8(aligned_ckpt: Path, moe):
    full = load_model(aligned_ckpt, dtype=torch.float32, progress=False, fp8=True)
    for rank in range(2):
        par = Parallel(rank, 2, moe)
        local = load_model(aligned_ckpt, dtype=torch.float32, progress=False, fp8=True, par=par)
        _assert_slices(local, full, par)
        attn, moe_layer = local.model.layers[1].self_attn, local.model.layers[1].mlp
        assert isinstance(attn.q_b_proj, FP8Linear) and isinstance(attn.o_proj, FP8Linear)
        assert isinstance(moe_layer.shared_experts.down_proj, FP8Linear)
        assert isinstance(moe_layer.experts[0].up_proj, FP8Linear) and moe_layer.w13_scale is not None
        assert fp8_aligned("model.layers.0.mlp.down_proj.weight", (256, 128), par, (128, 128))


def test_single_process_config_errors(dsv3_ckpt):
    with pytest.raises(ConfigError, match="parallel.size=2 but the runner was started without torchrun: "
                                          "launch it with torchrun --nproc-per-node 2"):
        LLM(str(dsv3_ckpt), device="cpu", progress=False, **{"parallel.size": 2})
    with pytest.raises(ConfigError, match="parallel.moe='dp' is not valid: choose one of ep, tp"):
        LLM(str(dsv3_ckpt), device="cpu", progress=False, **{"parallel.moe": "dp"})


def test_a_rank_reads_only_its_shards(aligned_ckpt: Path, monkeypatch: pytest.MonkeyPatch):
    """Split tensors are read as lazy slices (a rank's rows or columns only); other ranks' experts never."""
    import mla_runner.models.loader as loader

    reads: dict[str, int] = {}  # tensor -> elements read
    real_open = loader.safe_open

    class Counting:
        def __init__(self, *args, **kwargs):
            self.handle = real_open(*args, **kwargs)

        def __enter__(self):
            self.handle.__enter__()
            return self

        def __exit__(self, *exc):
            self.handle.__exit__(*exc)

        def keys(self):
            return self.handle.keys()

        def get_tensor(self, name):
            t = self.handle.get_tensor(name)
            reads[name] = reads.get(name, 0) + t.numel()
            return t

        def get_slice(self, name):
            sl = self.handle.get_slice(name)

            class Slice:
                def __getattr__(self, attr):  # get_shape, get_dtype
                    return getattr(sl, attr)

                def __getitem__(self, index):
                    t = sl[index]
                    reads[name] = reads.get(name, 0) + t.numel()
                    return t
            return Slice()

    monkeypatch.setattr(loader, "safe_open", Counting)
    load_model(aligned_ckpt, dtype=torch.float32, progress=False, fp8=True, par=Parallel(1, 2, "ep"))
    layer = "model.layers.1."
    assert not any(f"{layer}mlp.experts.{e}." in n for n in reads for e in (0, 1))
    assert reads[f"{layer}mlp.experts.3.up_proj.weight"] == 256 * 256  # an owned expert: whole
    assert reads[f"{layer}self_attn.q_b_proj.weight"] == 128 * 128  # half of [256, 128]
    assert reads[f"{layer}self_attn.o_proj.weight"] == 256 * 128 and reads["lm_head.weight"] == 256 * 256
    assert reads[f"{layer}self_attn.q_a_proj.weight"] == 128 * 256  # replicated
