"""Where a model comes from: a checkpoint directory, the embedded tiny checkpoint, or random weights."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional

import torch

from mla_runner.config import ModelConfig
from mla_runner.errors import ConfigError
from mla_runner.models import presets
from mla_runner.models.config import ModelArgs, read_json_object
from mla_runner.models.deepseek_v3 import DeepseekV3ForCausalLM
from mla_runner.models.errors import CheckpointError
from mla_runner.models.loader import load_model, load_tokenizer
from mla_runner.models.parallel import Parallel
from mla_runner.models.random_weights import random_model
from mla_runner.models.tiny import ensure_tiny_checkpoint

PRESETS = {
    "deepseek_v3": presets.DEEPSEEK_V3_CONFIG,
    "kimi_k2": presets.KIMI_K2_CONFIG,
    "tiny_deepseek_v3": presets.TINY_DEEPSEEK_V3_CONFIG,
    "tiny_kimi_k2": presets.TINY_KIMI_K2_CONFIG,
}
TINY_PRESETS = ("tiny_deepseek_v3", "tiny_kimi_k2")  # small enough to generate on first use


@dataclasses.dataclass
class ModelSource:
    """The architecture of the configured model, and where its weights will come from."""

    cfg: ModelConfig
    args: ModelArgs  # as run: truncated to cfg.num_layers when set, or cfg.depth layers where that is set
    path: Optional[Path]  # None: random weights
    loaded_args: Optional[ModelArgs] = None  # the layers loaded, where cfg.depth repeats them (else args)

    @classmethod
    def resolve(cls, cfg: ModelConfig) -> ModelSource:
        if cfg.preset not in PRESETS:
            raise ConfigError(f"model.preset={cfg.preset!r} is not one of {', '.join(sorted(PRESETS))}")
        if cfg.random_weights:
            path, args = None, ModelArgs.from_dict(PRESETS[cfg.preset], source=f"preset {cfg.preset}")
        else:
            path = checkpoint_dir(cfg)
            args = ModelArgs.from_dir(path)
            expected = PRESETS[cfg.preset]["model_type"]
            if args.model_type != expected:
                raise ConfigError(f"model={cfg.name} runs {expected} checkpoints, {path} holds a {args.model_type} "
                                  f"one: use model={args.model_type} (or pass the directory to LLM(), which "
                                  "picks it)")
        full_depth = args.num_hidden_layers
        if cfg.num_layers is not None:
            if cfg.num_layers > args.num_hidden_layers:
                raise ConfigError(f"model.num_layers={cfg.num_layers} is more than the model's "
                                  f"{args.num_hidden_layers}")
            args = dataclasses.replace(args, num_hidden_layers=cfg.num_layers)
        if cfg.depth is not None:
            return cls(cfg, _deepened(args, cfg, full_depth), path, loaded_args=args)
        return cls(cfg, args, path)

    def use_fp8(self, weights: str, device: torch.device) -> bool:
        """Resolve RunConfig.weights: keep FP8 weights in FP8 (True) or dequantize them at load (False)."""
        if weights == "bf16":
            return False
        fp8_checkpoint = self.path is not None and self.args.fp8_block is not None
        if weights == "auto":
            return fp8_checkpoint and device.type == "cuda"
        if self.path is not None and not fp8_checkpoint:
            raise ConfigError(f"weights=fp8 needs an FP8 checkpoint: {self.path} has no fp8 quantization_config")
        if fp8_checkpoint and tuple(self.args.fp8_block) != (128, 128):
            raise ConfigError(f"weights=fp8 supports 128x128 blocks only, {self.path} has {self.args.fp8_block}")
        return True

    def load(self, dtype: torch.dtype, device: torch.device, progress: bool,
             fp8: bool = False, par: Parallel = Parallel(), mtp: bool = False) -> DeepseekV3ForCausalLM:
        """The model, or this rank's shard of it (``par``); ``mtp``: with its MTP module (``model.mtp``)."""
        args = self.loaded_args or self.args
        if self.path is None:
            model = random_model(args, dtype=dtype, device=device, seed=self.cfg.seed, fp8=fp8, par=par, mtp=mtp)
        else:
            model = load_model(self.path, dtype=dtype, device=device, num_layers=self.cfg.num_layers,
                               progress=progress, fp8=fp8, par=par, mtp=mtp)
        if self.loaded_args is not None:
            model.repeat_layers(self.args.num_hidden_layers)
        return model

    def generation_config(self) -> dict[str, Any]:
        """The checkpoint's generation_config.json (its recommended sampling, extra EOS ids); {} without one and for
        random weights."""
        file = None if self.path is None else self.path / "generation_config.json"
        if file is None or not file.is_file():
            return {}
        return read_json_object(file)

    def tokenizer(self) -> Any:
        """The checkpoint's tokenizer; None for random weights (prompts are token ids then)."""
        return None if self.path is None else load_tokenizer(self.path, trust_remote_code=self.cfg.trust_remote_code)


def _deepened(args: ModelArgs, cfg: ModelConfig, full_depth: int) -> ModelArgs:
    """``args`` (truncated to ``cfg.num_layers``) with ``cfg.depth`` layers, checked: every layer past the truncation
    repeats a kept layer of its kind (``DeepseekV3ForCausalLM.repeat_layers``)."""
    if cfg.num_layers is None or not cfg.num_layers < cfg.depth:
        raise ConfigError(f"model.depth={cfg.depth} repeats the layers that model.num_layers keeps: set "
                          "model.num_layers below it")
    if cfg.depth > full_depth:
        raise ConfigError(f"model.depth={cfg.depth} is more than the model's {full_depth} layers")
    kept = {args.is_moe_layer(i) for i in range(cfg.num_layers)}
    missing = {args.is_moe_layer(i) for i in range(cfg.num_layers, cfg.depth)} - kept
    if missing:
        raise ConfigError(f"model.depth={cfg.depth}: layers past model.num_layers={cfg.num_layers} are MoE layers "
                          f"and none of the kept ones is (the first {args.first_k_dense_replace} are dense): keep "
                          f"at least {args.first_k_dense_replace + 1}")
    return dataclasses.replace(args, num_hidden_layers=cfg.depth)


def checkpoint_dir(cfg: ModelConfig) -> Path:
    """The checkpoint directory to load: ``cfg.path``, or the tiny preset generated into the cache."""
    if cfg.path is not None:
        path = Path(cfg.path).expanduser()
        if not path.is_dir():
            raise CheckpointError(f"{path}: checkpoint directory does not exist")
        return path
    if cfg.preset in TINY_PRESETS:
        return ensure_tiny_checkpoint(cfg.preset, PRESETS[cfg.preset], seed=cfg.seed, cache_root=cfg.cache_dir)
    raise ConfigError(f"model={cfg.name} needs its checkpoint: pass model.path=/path/to/checkpoint "
                      "(or model.random_weights=true for a benchmark)")
