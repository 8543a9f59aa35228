"""DeepSeek-V3's MTP module (models/mtp.py): its logits against an independent torch implementation of DeepSeek's MTP
formula on the tiny checkpoint, the loader's ``mtp`` flag (off by default, FP8, truncation, shards, sharing of the
embedding and head), its errors, and random-weight models with the module."""
from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mla_runner.attention import AttentionSpec, StepInputs
from mla_runner.attention.torch_backend import TorchBackend
from mla_runner.models.config import ModelArgs
from mla_runner.models.context import ForwardContext
from mla_runner.models.errors import CheckpointError
from mla_runner.models.fp8_linear import FP8Linear
from mla_runner.models.loader import load_model, read_weight_map
from mla_runner.models.mla import MLA
from mla_runner.models.parallel import Parallel, read_shard, shard_dim
from mla_runner.models.presets import TINY_DEEPSEEK_V3_CONFIG, TINY_KIMI_K2_CONFIG
from mla_runner.models.random_weights import random_model
from mla_testing.oracle import rel_err

TOL = 1e-4  # fp32 against the fp32 reference; measured agreement is about 1e-6
MTP = "model.layers.3."  # the tiny checkpoint's MTP layer (num_hidden_layers = 3)
PROMPT = [5, 77, 301, 12, 450, 9, 128, 64, 33, 201]
DECODE_STEPS = 3


# ------------------------------------------------------------------------- the independent reference


class Reference:
    """DeepSeek-V3 and its MTP module in plain torch, straight from the checkpoint's tensors (FP8 blocks dequantized
    here), written after DeepSeek's ``inference/model.py``: absorbed MLA with einsums over the whole sequence under a
    causal mask, complex-number RoPE with YaRN frequencies, the grouped sigmoid router with an expert loop. It uses
    nothing of the runner's model code, and reads the MTP layer's own embedding and head as stored.

    The MTP formula (DeepSeek-V3 report, sec. 2.2, with the order of vLLM's and SGLang's implementations): for the
    main model's final (normed) hidden state h_i and the next token t_{i+1},
    logits_i = head(norm(Block(eh_proj([enorm(emb(t_{i+1})) ; hnorm(h_i)])))) at position i.
    """

    def __init__(self, root: Path) -> None:
        self.c = json.loads((root / "config.json").read_text())
        self.w: dict[str, torch.Tensor] = {}
        weight_map = read_weight_map(root)
        for shard in sorted(set(weight_map.values())):
            with safe_open(str(root / shard), framework="pt") as f:
                raw = {n: f.get_tensor(n) for n in f.keys()}
            for name, t in raw.items():
                if name.endswith("_scale_inv"):
                    continue
                if t.dtype == torch.float8_e4m3fn:
                    s = raw[name + "_scale_inv"] if name + "_scale_inv" in raw else self._scale(root, weight_map, name)
                    rows, cols = t.shape
                    t = t.float() * s.repeat_interleave(128, 0)[:rows].repeat_interleave(128, 1)[:, :cols]
                self.w[name] = t.float()
        c = self.c
        self.heads, self.nope, self.rope, self.v = (c["num_attention_heads"], c["qk_nope_head_dim"],
                                                    c["qk_rope_head_dim"], c["v_head_dim"])
        self.rank, self.eps = c["kv_lora_rank"], c["rms_norm_eps"]
        y = c["rope_scaling"]
        mscale = 0.1 * y["mscale_all_dim"] * math.log(y["factor"]) + 1.0
        self.softmax_scale = (self.nope + self.rope) ** -0.5 * mscale * mscale
        self.freqs_cis = self._freqs_cis(c["max_position_embeddings"])

    @staticmethod
    def _scale(root: Path, weight_map: dict[str, str], name: str) -> torch.Tensor:
        with safe_open(str(root / weight_map[name + "_scale_inv"]), framework="pt") as f:
            return f.get_tensor(name + "_scale_inv")

    def _freqs_cis(self, seqlen: int) -> torch.Tensor:
        """DeepSeek's ``precompute_freqs_cis``: YaRN-blended inverse frequencies as unit complex numbers."""
        dim, base, y = self.rope, self.c["rope_theta"], self.c["rope_scaling"]

        def correction_dim(rotations: float) -> float:
            return dim * math.log(y["original_max_position_embeddings"] / (rotations * 2 * math.pi)) / (
                2 * math.log(base))

        low = max(math.floor(correction_dim(y["beta_fast"])), 0)
        high = min(math.ceil(correction_dim(y["beta_slow"])), dim - 1)
        ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / max(high - low, 0.001)).clamp(0, 1)
        freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        freqs = freqs / y["factor"] * ramp + freqs * (1 - ramp)
        angles = torch.outer(torch.arange(seqlen, dtype=torch.float32), freqs)
        return torch.polar(torch.ones_like(angles), angles)

    def norm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return self.w[name] * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))

    def linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return x @ self.w[name + ".weight"].t()

    @staticmethod
    def rotate(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
        """x [..., rope] as interleaved (real, imag) pairs times freqs_cis (broadcast)."""
        return torch.view_as_real(torch.view_as_complex(x.contiguous().unflatten(-1, (-1, 2))) * freqs_cis).flatten(-2)

    def attention(self, p: str, x: torch.Tensor) -> torch.Tensor:
        """MLA of the sequence x [S, hidden] (positions 0..S-1) with itself, causal, in DeepSeek's absorbed form."""
        S, H = x.shape[0], self.heads
        fc = self.freqs_cis[:S]
        q = self.linear(self.norm(self.linear(x, p + "q_a_proj"), p + "q_a_layernorm.weight"), p + "q_b_proj")
        q_nope, q_pe = q.view(S, H, self.nope + self.rope).split([self.nope, self.rope], -1)
        q_pe = self.rotate(q_pe, fc[:, None])
        kv, k_pe = self.linear(x, p + "kv_a_proj_with_mqa").split([self.rank, self.rope], -1)
        kv, k_pe = self.norm(kv, p + "kv_a_layernorm.weight"), self.rotate(k_pe, fc)
        wkv_b = self.w[p + "kv_b_proj.weight"].view(H, self.nope + self.v, self.rank)
        q_nope = torch.einsum("shd,hdc->shc", q_nope, wkv_b[:, : self.nope])
        scores = torch.einsum("shc,tc->sht", q_nope, kv) + torch.einsum("shr,tr->sht", q_pe, k_pe)
        scores = scores * self.softmax_scale
        causal = torch.ones(S, S, dtype=torch.bool).tril()
        scores = scores.masked_fill(~causal[:, None, :], float("-inf")).softmax(dim=-1)
        o = torch.einsum("sht,tc->shc", scores, kv)
        o = torch.einsum("shc,hdc->shd", o, wkv_b[:, -self.v :])
        return self.linear(o.flatten(1), p + "o_proj")

    def mlp(self, p: str, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.linear(x, p + "gate_proj"), self.linear(x, p + "up_proj")
        return self.linear(torch.nn.functional.silu(gate) * up, p + "down_proj")

    def moe(self, p: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Routed plus shared experts, and the chosen expert ids [T, k] (sorted)."""
        c = self.c
        scores = (x @ self.w[p + "gate.weight"].t()).sigmoid()
        biased = scores + self.w[p + "gate.e_score_correction_bias"]
        groups = biased.view(x.shape[0], c["n_group"], -1)
        best = groups.topk(2, dim=-1).values.sum(-1).topk(c["topk_group"], dim=-1).indices
        dropped = torch.ones(groups.shape[:2], dtype=torch.bool).scatter(1, best, False)
        ids = groups.masked_fill(dropped[..., None], float("-inf")).flatten(1).topk(c["num_experts_per_tok"]).indices
        weights = scores.gather(1, ids)
        weights = weights / weights.sum(-1, keepdim=True) * c["routed_scaling_factor"]
        y = torch.zeros_like(x)
        for t in range(x.shape[0]):
            for j, e in enumerate(ids[t].tolist()):
                y[t] += weights[t, j] * self.mlp(f"{p}experts.{e}.", x[t])
        return y + self.mlp(p + "shared_experts.", x), ids.sort(-1).values

    def layer(self, i: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        p = f"model.layers.{i}."
        x = x + self.attention(p + "self_attn.", self.norm(x, p + "input_layernorm.weight"))
        h = self.norm(x, p + "post_attention_layernorm.weight")
        if i < self.c["first_k_dense_replace"]:
            return x + self.mlp(p + "mlp.", h), None
        y, ids = self.moe(p + "mlp.", h)
        return x + y, ids

    def main(self, ids: Sequence[int]) -> torch.Tensor:
        """The main model's final hidden states [L, hidden], after model.norm."""
        x = self.w["model.embed_tokens.weight"][list(ids)]
        for i in range(self.c["num_hidden_layers"]):
            x = self.layer(i, x)[0]
        return self.norm(x, "model.norm.weight")

    def mtp(self, ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Draft logits [L - 1, vocab] of sequence ``ids``: row i predicts ids[i + 2] from h_i and ids[i + 1]; and the
        experts the MTP layer chose per row."""
        n = self.c["num_hidden_layers"]
        p = f"model.layers.{n}."
        h = self.main(ids)[:-1]
        e = self.w[p + "embed_tokens.weight"][list(ids[1:])]
        x = self.linear(torch.cat([self.norm(e, p + "enorm.weight"), self.norm(h, p + "hnorm.weight")], -1),
                        p + "eh_proj")
        y, experts = self.layer(n, x)
        return self.linear(self.norm(y, p + "shared_head.norm.weight"), p + "shared_head.head"), experts


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


def edit_tensors(root: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    """Apply ``edit`` to all the checkpoint's tensors at once, then write them back as one file with its index."""
    weight_map = read_weight_map(root)
    tensors = {}
    for shard in sorted(set(weight_map.values())):
        with safe_open(str(root / shard), framework="pt") as f:
            tensors |= {n: f.get_tensor(n) for n in f.keys()}
        (root / shard).unlink()
    edit(tensors)
    save_file(tensors, str(root / "model.safetensors"), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": dict.fromkeys(tensors, "model.safetensors")}
    (root / "model.safetensors.index.json").write_text(json.dumps(index))


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
