"""DeepSeek-V3's MTP module (models/mtp.py): its logits against an independent torch implementation of DeepSeek's MTP
formula on the tiny checkpoint, the loader's ``mtp`` flag (off by default, FP8, truncation, shards, sharing of the
embedding and head), its errors, and random-weight models with the module."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from mla_runner.attention import AttentionSpec, StepInputs
from mla_runner.attention.torch_backend import TorchBackend
from mla_runner.models.config import ModelArgs
from mla_runner.models.context import ForwardContext
from mla_runner.models.errors import CheckpointError
from mla_runner.models.fp8_linear import FP8Linear
from mla_runner.models.loader import load_model
from mla_runner.models.mla import MLA
from mla_runner.models.parallel import Parallel, read_shard, shard_dim
from mla_runner.models.presets import TINY_DEEPSEEK_V3_CONFIG, TINY_KIMI_K2_CONFIG
from mla_runner.models.random_weights import random_model
from mla_testing.mtp import Reference, edit_tensors
from mla_testing.oracle import rel_err

TOL = 1e-4  # fp32 against the fp32 reference; measured agreement is about 1e-6
MTP = "model.layers.3."  # the tiny checkpoint's MTP layer (num_hidden_layers = 3)
PROMPT = [5, 77, 301, 12, 450, 9, 128, 64, 33, 201]
DECODE_STEPS = 3


# --------------------------------------------------------------------------------------- our side


class PagedSequence:
    """One request through some MLA layers with their own paged latent caches (pages in a scrambled order)."""

    def __init__(self, layers: list[MLA], args: ModelArgs, *, page_size: int = 4, num_pages: int = 16,
                 seed: int = 0) -> None:
        self.layers, self.page_size = layers, page_size
        self.caches = [torch.zeros(num_pages, page_size, args.kv_cache_dim) for _ in layers]
        self.backend = TorchBackend(AttentionSpec(num_heads=args.num_attention_heads, kv_lora_rank=args.kv_lora_rank,
                                                  rope_dim=args.qk_rope_head_dim, page_size=page_size,
                                                  dtype=torch.float32, device=torch.device("cpu")))
        self.free = torch.randperm(num_pages, generator=torch.Generator().manual_seed(seed)).tolist()
        self.pages: list[int] = []
        self.length = 0

    def step(self, n: int) -> ForwardContext:
        """The context of the next ``n`` tokens (positions length .. length + n - 1); the layers get their caches."""
        start, end = self.length, self.length + n
        while len(self.pages) * self.page_size < end:
            self.pages.append(self.free.pop())
        slots = [self.pages[p // self.page_size] * self.page_size + p % self.page_size for p in range(start, end)]
        self.length = end
        meta = self.backend.build_metadata(StepInputs(torch.tensor([end]), torch.tensor([0, n]),
                                                      torch.tensor([self.pages])))
        for attn, cache in zip(self.layers, self.caches):
            attn.kv_cache = cache
        return ForwardContext(torch.arange(start, end), torch.tensor(slots), self.backend, meta)


@pytest.fixture(scope="module")
def mtp_model(dsv3_ckpt: Path) -> torch.nn.Module:
    return load_model(dsv3_ckpt, dtype=torch.float32, progress=False, mtp=True)


@pytest.fixture(scope="module")
def reference(dsv3_ckpt: Path) -> Reference:
    return Reference(dsv3_ckpt)


@torch.no_grad()
def test_mtp_logits_match_the_reference(mtp_model: torch.nn.Module, reference: Reference) -> None:
    """Prefill, then decode steps, as speculative decoding runs it: the main model's hidden states h_i feed the MTP
    module with the next token, through its own paged cache; each step's draft logits and MTP experts equal the
    reference's on the whole sequence, and so do the main model's hidden states (a check of the reference itself)."""
    model, mtp = mtp_model, mtp_model.mtp
    experts: list[torch.Tensor] = []
    hook = mtp.block.mlp.gate.register_forward_hook(lambda _m, _i, out: experts.append(out[1].sort(-1).values))
    try:
        main, draft = PagedSequence(model.attention_layers, model.args), PagedSequence(mtp.attention_layers,
                                                                                       model.args, seed=1)
        ids = list(PROMPT)
        hidden = model(torch.tensor(ids), main.step(len(ids)))
        tokens = ids[1:]  # the MTP rows of this step: (t_{i+1}, h_i)
        for step in range(DECODE_STEPS + 1):
            ids.append(int(model.compute_logits(hidden[-1:]).argmax()))
            tokens.append(ids[-1])
            logits = mtp.compute_logits(mtp(torch.tensor(tokens), hidden, draft.step(len(tokens))))
            want_logits, want_experts = reference.mtp(ids)
            assert rel_err(logits, want_logits[-len(tokens):]) < TOL, f"step {step}"
            assert torch.equal(experts.pop(), want_experts[-len(tokens):]), f"step {step}: other experts"
            want_hidden = reference.main(ids[:-1])
            assert rel_err(hidden, want_hidden[-len(hidden):]) < TOL
            hidden = model(torch.tensor(ids[-1:]), main.step(1))
            tokens = []
        assert draft.length == len(ids) - 1 and main.length == len(ids)
    finally:
        hook.remove()


def test_the_reference_is_not_the_reports_order(reference: Reference) -> None:
    """The concatenation order matters: [hnorm(h) ; enorm(emb)] (the report's equation as printed) gives other
    logits, so the test above tells the two apart."""
    p = MTP
    swapped = dict(reference.w)
    w = swapped[p + "eh_proj.weight"]
    half = w.shape[1] // 2
    swapped[p + "eh_proj.weight"] = torch.cat([w[:, half:], w[:, :half]], dim=1)
    other = Reference.__new__(Reference)
    other.__dict__.update(reference.__dict__, w=swapped)
    assert rel_err(other.mtp(PROMPT)[0], reference.mtp(PROMPT)[0]) > 0.1


# ------------------------------------------------------------------------------------- the loader


@pytest.fixture
def ckpt(dsv3_ckpt: Path, tmp_path: Path) -> Path:
    """A private copy of the DeepSeek-flavour checkpoint, free to break."""
    return Path(shutil.copytree(dsv3_ckpt, tmp_path / "ckpt"))


def mtp_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: t for n, t in model.state_dict().items() if n.startswith("mtp.")}


def test_off_by_default(dsv3_model: torch.nn.Module, mtp_model: torch.nn.Module) -> None:
    """Without the flag no module and no MTP tensor (the streaming test of test_loader.py: none is read); with it,
    the main model is the same."""
    assert dsv3_model.mtp is None and not mtp_state(dsv3_model)
    assert mtp_model.attention_layers == [layer.self_attn for layer in mtp_model.model.layers]
    for name, t in dsv3_model.state_dict().items():
        assert torch.equal(t, mtp_model.state_dict()[name]), name


def test_loaded_module_and_shared_tensors(mtp_model: torch.nn.Module, dsv3_ckpt: Path) -> None:
    """Every stored MTP tensor is in place under the module's names; the embedding and head, stored as copies of the
    main model's (as DeepSeek-V3's are), are the main model's tensors: no memory of their own."""
    mtp = mtp_model.mtp
    assert mtp.layer == 3 and mtp.attention_layers == [mtp.block.self_attn] and mtp.block.mlp.w13 is not None
    assert mtp.embed_tokens.weight.data_ptr() == mtp_model.model.embed_tokens.weight.data_ptr()
    assert mtp.lm_head.weight.data_ptr() == mtp_model.lm_head.weight.data_ptr()
    ref = Reference(dsv3_ckpt).w
    renamed = {"mtp.norm.weight": MTP + "shared_head.norm.weight",
               "mtp.lm_head.weight": MTP + "shared_head.head.weight"}
    state = mtp_state(mtp_model)
    for name, t in state.items():
        stored = renamed.get(name, name.replace("mtp.block.", MTP).replace("mtp.", MTP))
        assert torch.equal(t, ref[stored]), name
    assert len(state) == sum(n.startswith(MTP) for n in ref)


def test_unquantized_checkpoint_gives_the_same_module(ckpt: Path, mtp_model: torch.nn.Module) -> None:
    """The fp32 flavour (FP8 blocks dequantized, no quantization_config): the same MTP tensors."""
    ref = Reference(ckpt).w
    edit_tensors(ckpt, lambda t: (t.clear(), t.update({n: w.contiguous() for n, w in ref.items()})))
    config = json.loads((ckpt / "config.json").read_text())
    del config["quantization_config"]
    (ckpt / "config.json").write_text(json.dumps(config))
    plain = load_model(ckpt, dtype=torch.float32, progress=False, mtp=True)
    assert plain.args.fp8_block is None
    for name, t in mtp_state(mtp_model).items():
        assert torch.equal(mtp_state(plain)[name], t), name


def test_fp8_weights_stay_fp8_in_the_block(dsv3_ckpt: Path) -> None:
    model = load_model(dsv3_ckpt, dtype=torch.float32, progress=False, mtp=True, fp8=True)
    attn, moe = model.mtp.block.self_attn, model.mtp.block.mlp
    assert isinstance(attn.o_proj, FP8Linear) and isinstance(attn.q_b_proj, FP8Linear)
    assert isinstance(moe.experts[0].up_proj, FP8Linear) and isinstance(moe.shared_experts.down_proj, FP8Linear)
    assert type(model.mtp.eh_proj) is torch.nn.Linear and type(model.mtp.lm_head) is torch.nn.Linear  # bf16 stored
    assert not isinstance(attn.kv_b_proj, FP8Linear) and attn.w_uk is not None
    assert model.mtp.lm_head.weight.data_ptr() == model.lm_head.weight.data_ptr()


def test_own_embedding_where_the_stored_one_differs_and_shared_head_where_absent(ckpt: Path) -> None:
    def edit(t: dict[str, torch.Tensor]) -> None:
        t[MTP + "embed_tokens.weight"] = t[MTP + "embed_tokens.weight"] + 1
        del t[MTP + "shared_head.head.weight"]

    edit_tensors(ckpt, edit)
    model = load_model(ckpt, dtype=torch.float32, progress=False, mtp=True)
    mtp = model.mtp
    assert mtp.embed_tokens.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    stored = (model.model.embed_tokens.weight.bfloat16() + 1).float()  # as edited: in bf16
    torch.testing.assert_close(mtp.embed_tokens.weight, stored, rtol=0, atol=0)
    assert mtp.lm_head.weight.data_ptr() == model.lm_head.weight.data_ptr()


def test_truncated_model_keeps_its_mtp_layer(dsv3_ckpt: Path, mtp_model: torch.nn.Module) -> None:
    """num_layers keeps the first layers; the MTP module is still the files' layer 3 (MoE like it)."""
    small = load_model(dsv3_ckpt, dtype=torch.float32, progress=False, mtp=True, num_layers=1)
    assert len(small.model.layers) == 1 and small.mtp.layer == 3
    for name, t in mtp_state(mtp_model).items():
        assert torch.equal(mtp_state(small)[name], t), name


@pytest.mark.parametrize("moe", ["ep", "tp"])
def test_sharded_load_holds_slices_of_the_module(dsv3_ckpt: Path, mtp_model: torch.nn.Module, moe: str) -> None:
    full = mtp_state(mtp_model)
    for rank in range(2):
        par = Parallel(rank, 2, moe)
        local = load_model(dsv3_ckpt, dtype=torch.float32, progress=False, par=par, mtp=True)
        for name, t in mtp_state(local).items():
            want = read_shard(full[name], full[name].shape, shard_dim(name, par), par)
            assert torch.equal(t, want), name
        assert local.mtp.lm_head.weight.shape[0] == 256 and local.mtp.block.self_attn.n_heads == 4
        assert local.mtp.lm_head.weight.data_ptr() == local.lm_head.weight.data_ptr()


def test_model_without_an_mtp_layer(kimi_ckpt: Path) -> None:
    with pytest.raises(CheckpointError, match=r"the MTP module was asked for, but this kimi_k2 model has none "
                                              r"\(num_nextn_predict_layers=0 in config.json\)"):
        load_model(kimi_ckpt, progress=False, mtp=True)


def test_checkpoint_without_its_mtp_layer(ckpt: Path) -> None:
    edit_tensors(ckpt, lambda t: [t.pop(n) for n in list(t) if n.startswith(MTP)])
    with pytest.raises(CheckpointError, match=r"announces an MTP layer \(num_nextn_predict_layers=1\), but no tensor "
                                              r"model.layers.3.\* is stored"):
        load_model(ckpt, progress=False, mtp=True)
    assert load_model(ckpt, dtype=torch.float32, progress=False).mtp is None  # without the flag: as before


def test_missing_mtp_tensor(ckpt: Path) -> None:
    edit_tensors(ckpt, lambda t: t.pop(MTP + "hnorm.weight"))
    with pytest.raises(CheckpointError, match=f"tensor {MTP}hnorm.weight is missing"):
        load_model(ckpt, progress=False, mtp=True)


# ----------------------------------------------------------------------------------- random weights


@pytest.mark.parametrize("fp8", [False, True])
def test_random_model_with_the_module(fp8: bool) -> None:
    """The main model's draws are the same with or without the module; embedding and head shared; FP8 where the
    real files are."""
    args = ModelArgs.from_dict(TINY_DEEPSEEK_V3_CONFIG)
    plain = random_model(args, dtype=torch.float32, device="cpu", seed=1, fp8=fp8)
    model = random_model(args, dtype=torch.float32, device="cpu", seed=1, fp8=fp8, mtp=True)
    for name, t in plain.state_dict().items():
        assert torch.equal(t, model.state_dict()[name]), name
    mtp = model.mtp
    assert mtp.layer == 3 and mtp.lm_head.weight.data_ptr() == model.lm_head.weight.data_ptr()
    assert mtp.embed_tokens.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert not any(t.is_meta for t in mtp_state(model).values()) and mtp.enorm.weight.eq(1).all()
    assert isinstance(mtp.block.self_attn.o_proj, FP8Linear) == fp8
    assert type(mtp.eh_proj) is torch.nn.Linear and mtp.eh_proj.weight.std() > 0


def test_random_model_without_an_mtp_layer() -> None:
    with pytest.raises(CheckpointError, match="kimi_k2 model has none"):
        random_model(ModelArgs.from_dict(TINY_KIMI_K2_CONFIG), dtype=torch.float32, device="cpu", mtp=True)


def test_errors_name_the_stored_tensor(ckpt: Path) -> None:
    name = MTP + "self_attn.o_proj.weight"
    edit_tensors(ckpt, lambda t: t.pop(name + "_scale_inv"))
    with pytest.raises(CheckpointError, match=f"FP8 tensor {name} has no {name}_scale_inv"):
        load_model(ckpt, progress=False, mtp=True)
