"""Test-side machinery: transformers' ``DeepseekV3ForCausalLM`` as the oracle, and a paged harness for ours.

The oracle runs on an fp32 dequantized copy of a tiny checkpoint (transformers' own FP8 path dequantizes to
bf16 on CPU, which flips routing); our model loads the FP8 original through ``mla_runner.models.loader``. Our model
runs through ``PagedRunner``: requests flattened into one batch, latent vectors in a paged cache whose pages are
handed out in a scrambled order, attention by the torch backend (``mla_runner.kernels.reference``).
"""
from __future__ import annotations

import json
import shutil
from collections.abc import Hashable, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from mla_runner.attention import AttentionSpec, StepInputs
from mla_runner.attention.torch_backend import TorchBackend
from mla_runner.kernels.fp8_block import dequantize_fp8_block
from mla_runner.models.context import ForwardContext
from mla_runner.models.deepseek_v3 import DeepseekV3ForCausalLM
from mla_runner.models.loader import is_skipped, read_weight_map

# ---------------------------------------------------------------------------------------------- the oracle


def dequantized_copy(src: Path, dst: Path) -> Path:
    """``src`` as an fp32 single-file checkpoint: FP8 weights dequantized, scales, MTP and inv_freq dropped."""
    config = json.loads((src / "config.json").read_text())
    block = tuple(config.pop("quantization_config")["weight_block_size"])
    layers = config["num_hidden_layers"]
    dst.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, shard in read_weight_map(src).items():
        if is_skipped(name, layers) or name.endswith("_scale_inv"):
            continue
        with safe_open(str(src / shard), framework="pt") as f:
            w = f.get_tensor(name)
        if w.dtype == torch.float8_e4m3fn:
            with safe_open(str(src / read_weight_map(src)[name + "_scale_inv"]), framework="pt") as f:
                w = dequantize_fp8_block(w, f.get_tensor(name + "_scale_inv"), block)
        tensors[name] = w.float().contiguous()
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / f, dst / f)
    return dst


def load_oracle(ckpt: Path, work_dir: Path) -> nn.Module:
    """transformers' DeepseekV3ForCausalLM (fp32, eager attention) on a dequantized copy of ``ckpt``.

    Kimi-K2: transformers 5 keys its per-expert weight conversion by model_type and silently leaves experts
    random for ``kimi_k2``, so the config is read as DeepseekV3Config and relabelled ``deepseek_v3``.
    """
    from transformers import DeepseekV3Config
    from transformers import DeepseekV3ForCausalLM as HFDeepseekV3

    copy = dequantized_copy(ckpt, work_dir)
    config = DeepseekV3Config.from_pretrained(str(copy))
    config.model_type = "deepseek_v3"
    model = HFDeepseekV3.from_pretrained(str(copy), config=config, dtype=torch.float32, attn_implementation="eager")
    return model.eval()


class ExpertRecorder:
    """Expert ids chosen per MoE layer, from forward hooks on the routers (ours or transformers')."""

    def __init__(self, layers: Sequence[nn.Module]) -> None:
        self.chosen: dict[int, list[torch.Tensor]] = {}
        self._handles = [
            layer.mlp.gate.register_forward_hook(self._hook(i))
            for i, layer in enumerate(layers)
            if hasattr(layer.mlp, "experts")  # MoE layers, in both implementations
        ]

    def _hook(self, layer: int):
        def record(_module: nn.Module, _inputs: object, output: tuple[torch.Tensor, ...]) -> None:
            self.chosen.setdefault(layer, []).append(output[-1].sort(dim=-1).values)  # ids are the last output

        return record

    def take(self) -> dict[int, torch.Tensor]:
        """{layer: [tokens, k] sorted ids} over the forwards since the last take."""
        out = {layer: torch.cat(ids) for layer, ids in self.chosen.items()}
        self.chosen.clear()
        return out

    def close(self) -> None:
        for h in self._handles:
            h.remove()


@torch.no_grad()
def oracle_greedy(oracle: nn.Module, ids: list[int], max_tokens: int, eos: int) -> list[int]:
    """transformers' greedy continuation, recomputed from scratch each token (no cache to get wrong)."""
    seq, out = list(ids), []
    for _ in range(max_tokens):
        token = int(oracle(torch.tensor([seq])).logits[0, -1].argmax())
        out.append(token)
        seq.append(token)
        if token == eos:
            break
    return out


def random_prompts(vocab: int, eos: int, lengths: Sequence[int]) -> list[list[int]]:
    """Prompts of the given lengths, ids drawn (seed 0) from [2, vocab - 2) without ``eos`` (a prompt it empties is
    [2])."""
    g = torch.Generator().manual_seed(0)
    out = []
    for n in lengths:
        ids = torch.randint(2, vocab - 2, (n,), generator=g).tolist()
        out.append([t for t in ids if t != eos] or [2])
    return out


def oracle_forward(oracle: nn.Module, ids: Sequence[int]) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """All-position logits [L, V] of one sequence and the experts each token chose per MoE layer."""
    recorder = ExpertRecorder(oracle.model.layers)
    try:
        logits = oracle(torch.tensor([list(ids)])).logits[0].float()
        return logits, recorder.take()
    finally:
        recorder.close()


# ------------------------------------------------------------------------------------------- the harness


class PagedRunner:
    """Runs our model like the engine: a step is any mix of requests' new tokens (prefill or decode)."""

    def __init__(self, model: DeepseekV3ForCausalLM, *, page_size: int = 4, num_pages: int = 96, seed: int = 0) -> None:
        self.model, self.page_size = model, page_size
        args, weight = model.args, model.lm_head.weight
        self.device = weight.device
        self.caches = [
            torch.zeros(num_pages, page_size, args.kv_cache_dim, dtype=weight.dtype, device=self.device)
            for _ in model.attention_layers
        ]
        self.backend = TorchBackend(AttentionSpec(num_heads=args.num_attention_heads, kv_lora_rank=args.kv_lora_rank,
                                                  rope_dim=args.qk_rope_head_dim, page_size=page_size,
                                                  dtype=weight.dtype, device=self.device))
        # Pages are handed out in a scrambled order so a request's pages are never contiguous.
        self.free = torch.randperm(num_pages, generator=torch.Generator().manual_seed(seed)).tolist()
        self.pages: dict[Hashable, list[int]] = {}
        self.lens: dict[Hashable, int] = {}

    @torch.no_grad()
    def step(self, new_tokens: dict[Hashable, Sequence[int]]) -> dict[Hashable, torch.Tensor]:
        """Feed each request's new tokens in one forward; returns each request's logits [n_new, V]."""
        ids, positions, slots, qo, seq_lens = [], [], [], [0], []
        for req, tokens in new_tokens.items():
            start = self.lens.get(req, 0)
            end = start + len(tokens)
            pages = self.pages.setdefault(req, [])
            while len(pages) * self.page_size < end:
                pages.append(self.free.pop())
            ids += tokens
            positions += range(start, end)
            slots += [pages[p // self.page_size] * self.page_size + p % self.page_size for p in range(start, end)]
            qo.append(qo[-1] + len(tokens))
            seq_lens.append(end)
            self.lens[req] = end
        width = max(len(self.pages[r]) for r in new_tokens)
        table = [self.pages[r] + [0] * (width - len(self.pages[r])) for r in new_tokens]
        def tensor(values: list) -> torch.Tensor:
            return torch.tensor(values, device=self.device)

        metadata = self.backend.build_metadata(StepInputs(tensor(seq_lens), tensor(qo), tensor(table)))
        ctx = ForwardContext(tensor(positions), tensor(slots), self.backend, metadata)
        for attn, cache in zip(self.model.attention_layers, self.caches):  # several runners may share a model
            attn.kv_cache = cache
        logits = self.model.compute_logits(self.model(tensor(ids), ctx))
        return dict(zip(new_tokens, logits.split([len(t) for t in new_tokens.values()])))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: one number per comparison, robust to near-zero entries."""
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())
