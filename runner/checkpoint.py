"""Where a model's weights come from: a checkpoint directory, or the embedded tiny checkpoint."""
from __future__ import annotations

from pathlib import Path

from models.errors import CheckpointError
from models import presets
from models.tiny import ensure_tiny_checkpoint
from runner.config import ModelConfig
from runner.errors import ConfigError

PRESETS = {
    "deepseek_v3": presets.DEEPSEEK_V3_CONFIG,
    "kimi_k2": presets.KIMI_K2_CONFIG,
    "tiny_deepseek_v3": presets.TINY_DEEPSEEK_V3_CONFIG,
    "tiny_kimi_k2": presets.TINY_KIMI_K2_CONFIG,
}
TINY_PRESETS = ("tiny_deepseek_v3", "tiny_kimi_k2")  # small enough to generate on first use


def resolve_checkpoint(cfg: ModelConfig, progress: bool = True) -> Path:
    """The checkpoint directory to load: ``cfg.path``, or the tiny preset generated into the cache."""
    if cfg.path is not None:
        path = Path(cfg.path).expanduser()
        if not path.is_dir():
            raise CheckpointError(f"{path}: checkpoint directory does not exist")
        return path
    if cfg.preset in TINY_PRESETS:
        return ensure_tiny_checkpoint(cfg.preset, PRESETS[cfg.preset], seed=cfg.seed)
    if cfg.preset in PRESETS:
        raise ConfigError(f"model={cfg.name} needs its checkpoint: pass model.path=/path/to/checkpoint")
    raise ConfigError(f"model.preset={cfg.preset!r} is not one of {', '.join(sorted(PRESETS))}")
