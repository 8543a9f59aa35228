"""An independent torch reference of DeepSeek-V3 and its MTP module on a checkpoint directory, and a way to edit a
checkpoint's tensors (tests/models/test_mtp.py, tests/runner/engine/test_mtp_drafting.py)."""
from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mla_runner.models.loader import read_weight_map


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

    def drafts(self, ids: Sequence[int], k: int) -> tuple[list[int], torch.Tensor]:
        """The k drafts after sequence ``ids`` (its last token just emitted) as speculative decoding chains the MTP
        layer, and their logits [k, vocab]: draft 1 from the row of the second-to-last position (h there and the last
        token); draft j + 1 from one row further, whose token is draft j and whose hidden state is the previous row's
        output after shared_head.norm. Every row runs causally over the whole sequence of rows, from scratch."""
        n = self.c["num_hidden_layers"]
        p = f"model.layers.{n}."
        hidden, tokens = self.main(ids[:-1]), list(ids[1:])
        drafts, logits = [], []
        for _ in range(k):
            e = self.w[p + "embed_tokens.weight"][tokens]
            x = self.linear(torch.cat([self.norm(e, p + "enorm.weight"), self.norm(hidden, p + "hnorm.weight")], -1),
                            p + "eh_proj")
            y = self.norm(self.layer(n, x)[0][-1:], p + "shared_head.norm.weight")
            logits.append(self.linear(y, p + "shared_head.head")[0])
            drafts.append(int(logits[-1].argmax()))
            tokens.append(drafts[-1])
            hidden = torch.cat([hidden, y])
        return drafts, torch.stack(logits)
