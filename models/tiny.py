"""Tiny random-weight checkpoints in exactly the real on-disk format, written deterministically from a seed.

What makes them "real format": FP8 e4m3 ``*_proj.weight`` with f32 ``weight_scale_inv`` per 128x128 block (partial
edge blocks at tiny dims), bf16 embeddings / norms / router, f32 ``e_score_correction_bias``, several shards
named like DeepSeek's (``model-00001-of-000003``) or Kimi's (``model-1-of-3``) behind
``model.safetensors.index.json``, the original config.json, optionally the MTP layer's tensors (random like the rest,
but for its embedding and head: copies of the main model's, as in DeepSeek-V3's files) and ``rotary_emb.inv_freq``
tensors that a loader must skip, and a trained tokenizer with the model's vocab size.

Weights: linear layers std 1/sqrt(fan_in), embeddings std 1, norms 1 +- 0.1, a small router bias, so the
tiny model's greedy continuations vary with the prompt instead of repeating one token.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import save_file

from mla_runner.kernels.fp8_block import quantize_fp8_block
from mla_runner.models.config import ModelArgs
from mla_runner.models.deepseek_v3 import DecoderLayer, DeepseekV3ForCausalLM
from mla_runner.models.tiny_tokenizer import write_tokenizer

ShardStyle = Literal["deepseek", "kimi"]
FORMAT_VERSION = 3  # part of the cache key: bump when the files written here change
MANIFEST = "mla-runner-manifest.json"  # the sizes and hashes of a cached checkpoint's files
log = logging.getLogger(__name__)


def make_tiny_checkpoint(
    out_dir: str | Path,
    config: dict[str, Any],
    *,
    seed: int = 0,
    num_shards: int = 3,
    shard_style: ShardStyle | None = None,
    mtp: bool = True,
    inv_freq: bool = False,
) -> Path:
    """Write a checkpoint for ``config`` (a config.json dict) into ``out_dir`` (created); returns ``out_dir``.

    Defaults follow the family's published files: its shard names (``shard_style`` None), the MTP layers
    that ``num_nextn_predict_layers`` announces (``mtp``), no ``inv_freq`` tensors (only some Kimi-derived
    files have them).
    """
    args = ModelArgs.from_dict(config)
    if shard_style is None:
        shard_style = "kimi" if args.model_type == "kimi_k2" else "deepseek"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = stored_tensors(args, seed, mtp=mtp, inv_freq=inv_freq)
    weight_map: dict[str, str] = {}
    shards = _split(tensors, num_shards)
    for i, names in enumerate(shards):
        file = _shard_name(i + 1, len(shards), shard_style)
        save_file({n: tensors[n] for n in names}, str(out / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, file))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    write_tokenizer(args, out)
    return out


def ensure_tiny_checkpoint(
    name: str,
    config: dict[str, Any],
    seed: int = 0,
    *,
    cache_root: str | Path | None = None,
    **options: Any,
) -> Path:
    """The checkpoint for (config, seed, options) in the cache, written once, checked every time.

    Lives in ``cache_root`` (default ``$XDG_CACHE_HOME/mla-runner`` or ``~/.cache/mla-runner``) under
    ``<name>-<hash of config, seed, options and FORMAT_VERSION>``. It is written into a temporary sibling with a
    manifest of its files' sizes and SHA-256 (``MANIFEST``) and renamed into place, so concurrent or interrupted
    runs never see half a checkpoint; one that no longer matches its manifest (a file damaged or missing) is
    written again. ``options`` are ``make_tiny_checkpoint``'s keywords.
    """
    key = json.dumps({"config": config, "seed": seed, "options": options, "format": FORMAT_VERSION}, sort_keys=True)
    root = Path(cache_root).expanduser() if cache_root is not None else default_cache_root()
    final = root / f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    if final.is_dir():
        damage = manifest_problem(final)
        if damage is None:
            return final
        log.warning("%s is damaged (%s): writing it again", final, damage)
        _remove(final, root)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    try:
        make_tiny_checkpoint(tmp, config, seed=seed, **options)
        write_manifest(tmp)
        os.rename(tmp, final)
    except OSError:
        if not final.is_dir():  # a concurrent writer did not win the race: a real failure
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def write_manifest(directory: Path) -> None:
    """``MANIFEST``: the size and SHA-256 of every file in ``directory``."""
    files = {p.name: _fingerprint(p) for p in sorted(directory.iterdir()) if p.is_file() and p.name != MANIFEST}
    (directory / MANIFEST).write_text(json.dumps(files, indent=1) + "\n")


def manifest_problem(directory: Path) -> str | None:
    """What differs from the directory's manifest (a missing manifest or file, another size or hash); None if
    nothing does."""
    try:
        files = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError):
        return f"no readable {MANIFEST}"
    for name, want in files.items():
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        if _fingerprint(path) != want:
            return f"{name} differs from the one written"
    return None


def _fingerprint(path: Path) -> dict[str, Any]:
    return {"size": path.stat().st_size, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def _remove(directory: Path, root: Path) -> None:
    """Move ``directory`` aside (one rename, so no reader sees it half deleted), then delete it."""
    doomed = Path(tempfile.mkdtemp(prefix=f".{directory.name}.damaged.", dir=root))
    try:
        os.rename(directory, doomed / directory.name)
    except OSError:
        pass  # another process moved it first
    shutil.rmtree(doomed, ignore_errors=True)


def default_cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mla-runner"


def stored_tensors(args: ModelArgs, seed: int, *, mtp: bool, inv_freq: bool) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint, in file order, in its stored dtype (fp8 weights followed by their scale)."""
    gen = torch.Generator().manual_seed(seed)
    shared: dict[str, str] = {}  # MTP tensor -> the main model's tensor it copies
    with torch.device("meta"):
        shapes = {n: t.shape for n, t in DeepseekV3ForCausalLM(args).state_dict().items()}
        if mtp:
            for i in range(args.num_hidden_layers, args.num_hidden_layers + args.num_nextn_predict_layers):
                shapes.update(_mtp_shapes(args, i))
                shared |= {f"model.layers.{i}.embed_tokens.weight": "model.embed_tokens.weight",
                           f"model.layers.{i}.shared_head.head.weight": "lm_head.weight"}
    out: dict[str, torch.Tensor] = {}
    for name, shape in shapes.items():
        if name in shared:
            out[name] = out[shared[name]].clone()  # a copy: safetensors stores no shared memory
            continue
        w = _random(name, shape, gen)
        if _is_fp8(name):
            out[name], out[f"{name}_scale_inv"] = quantize_fp8_block(w)
        else:
            out[name] = w.float() if name.endswith("e_score_correction_bias") else w.bfloat16()
    if inv_freq:
        dim = args.qk_rope_head_dim
        freq = 1.0 / args.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
        for i in range(args.num_hidden_layers):
            out[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = freq.clone()
    return out


def _mtp_shapes(args: ModelArgs, layer: int) -> dict[str, torch.Size]:
    """A multi-token-prediction module as stored: a decoder layer plus its own embedding, norms and head (the
    embedding and head written as copies of the main model's, as in DeepSeek-V3's files)."""
    h, v = args.hidden_size, args.vocab_size
    prefix = f"model.layers.{layer}"
    shapes = {f"{prefix}.{n}": t.shape for n, t in DecoderLayer(args, layer).state_dict().items()}
    extra = {
        "embed_tokens.weight": (v, h),
        "enorm.weight": (h,),
        "hnorm.weight": (h,),
        "eh_proj.weight": (h, 2 * h),
        "shared_head.norm.weight": (h,),
        "shared_head.head.weight": (v, h),
    }
    return shapes | {f"{prefix}.{n}": torch.Size(s) for n, s in extra.items()}


def _is_fp8(name: str) -> bool:
    """Projection weights of attention and MLPs are FP8 in the real files; eh_proj (MTP) stays bf16."""
    return name.endswith("_proj.weight") and not name.endswith("eh_proj.weight")


def _random(name: str, shape: torch.Size, gen: torch.Generator) -> torch.Tensor:
    if name.endswith("norm.weight"):
        return 1.0 + 0.1 * torch.randn(shape, generator=gen)
    if name.endswith("e_score_correction_bias"):
        return 0.01 * torch.randn(shape, generator=gen)
    if name.endswith("embed_tokens.weight"):
        return torch.randn(shape, generator=gen)
    return torch.randn(shape, generator=gen) / shape[-1] ** 0.5


def _split(tensors: dict[str, torch.Tensor], num_shards: int) -> list[list[str]]:
    """Consecutive groups of about equal bytes; an fp8 weight and its scale stay together."""
    names = list(tensors)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    groups: list[list[str]] = [[] for _ in range(num_shards)]
    done = 0
    for name in names:
        shard = min(done * num_shards // max(total, 1), num_shards - 1)
        if name.endswith("_scale_inv"):
            shard = next(i for i, g in enumerate(groups) if g and g[-1] == name.removesuffix("_scale_inv"))
        groups[shard].append(name)
        done += tensors[name].numel() * tensors[name].element_size()
    return [g for g in groups if g]


def _shard_name(i: int, n: int, style: ShardStyle) -> str:
    return f"model-{i:05d}-of-{n:06d}.safetensors" if style == "deepseek" else f"model-{i}-of-{n}.safetensors"
