"""``ModelArgs``: the architecture numbers of a DeepSeek-V3 / Kimi-K2 checkpoint, parsed from its config.json.

Both families are ``DeepseekV3ForCausalLM``; only the numbers differ. Two dialects of the RoPE section exist:
the original files use ``rope_scaling: {type: yarn, ...}`` plus a top-level ``rope_theta``, while transformers 5
``save_pretrained`` writes ``rope_parameters: {rope_type: yarn, rope_theta, ...}``. Both parse to the same args.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mla_runner.models.errors import CheckpointError

MODEL_TYPES = ("deepseek_v3", "kimi_k2")


@dataclass(frozen=True)
class YarnScaling:
    """YaRN context extension: frequency interpolation plus an attention temperature (mscale).

    ``mscale`` / ``mscale_all_dim`` are 0.0 when config.json omits them (transformers treats them as unset).
    """

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 0.0
    mscale_all_dim: float = 0.0

    @property
    def cos_sin_scale(self) -> float:
        """YaRN's scale on cos/sin (transformers' ``attention_factor``): exactly 1 when mscale == mscale_all_dim,
        as in both real models, whose temperature lives entirely in the softmax scale."""
        if self.mscale and self.mscale_all_dim:
            return yarn_mscale(self.factor, self.mscale) / yarn_mscale(self.factor, self.mscale_all_dim)
        return yarn_mscale(self.factor, 1.0)


def yarn_mscale(factor: float, mscale: float) -> float:
    """YaRN's attention temperature for a context extended ``factor`` times (1.0 when not extended)."""
    return 1.0 if factor <= 1.0 else 0.1 * mscale * math.log(factor) + 1.0


@dataclass(frozen=True)
class ModelArgs:
    """The numbers of one model (field names as in config.json); validated on construction."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    n_group: int
    topk_group: int
    first_k_dense_replace: int
    routed_scaling_factor: float
    norm_topk_prob: bool
    rms_norm_eps: float
    max_position_embeddings: int
    rope_theta: float
    rope_scaling: YarnScaling | None
    bos_token_id: int | None
    eos_token_id: int | tuple[int, ...] | None  # config.json may give one id or a list
    num_nextn_predict_layers: int = 0
    fp8_block: tuple[int, int] | None = None  # weight_block_size of an FP8 checkpoint, None when unquantized

    def __post_init__(self) -> None:
        if self.n_routed_experts % self.n_group or not 1 <= self.topk_group <= self.n_group:
            raise CheckpointError(
                f"routing groups are inconsistent: n_routed_experts={self.n_routed_experts}, "
                f"n_group={self.n_group}, topk_group={self.topk_group}"
            )
        if self.qk_rope_head_dim % 2:
            raise CheckpointError(f"qk_rope_head_dim={self.qk_rope_head_dim} must be even (RoPE rotates pairs)")
        if not 0 <= self.first_k_dense_replace <= self.num_hidden_layers:
            raise CheckpointError(f"first_k_dense_replace={self.first_k_dense_replace} is out of range")
        if self.num_nextn_predict_layers < 0:
            raise CheckpointError(f"num_nextn_predict_layers={self.num_nextn_predict_layers} must be >= 0")

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def kv_cache_dim(self) -> int:
        """Width of one latent cache vector: [normalized c_kv | rotated k_pe]."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        """qk_head_dim^-0.5, times YaRN's mscale squared (applied to q.k, not to cos/sin)."""
        scale = self.qk_head_dim**-0.5
        if self.rope_scaling is not None and self.rope_scaling.mscale_all_dim:
            scale *= yarn_mscale(self.rope_scaling.factor, self.rope_scaling.mscale_all_dim) ** 2
        return scale

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Every EOS id of config.json (none, one, or the list it gives)."""
        return token_ids(self.eos_token_id)

    @property
    def has_mtp(self) -> bool:
        """Whether the model has a multi-token-prediction module (models/mtp.py): DeepSeek-V3 one, Kimi-K2 none."""
        return self.num_nextn_predict_layers >= 1

    def is_moe_layer(self, layer: int) -> bool:
        return layer >= self.first_k_dense_replace

    @classmethod
    def from_dir(cls, path: str | Path) -> ModelArgs:
        file = Path(path) / "config.json"
        if not file.is_file():
            raise CheckpointError(f"{file}: config.json not found")
        return cls.from_dict(read_json_object(file), source=str(file))

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> ModelArgs:
        """Parse a HF config dict; every error names ``source`` and the offending field."""
        fields = _Fields(d, source)
        model_type = fields.get("model_type", str)
        if model_type not in MODEL_TYPES:
            raise CheckpointError(f"{source}: unknown model_type {model_type!r} (expected one of {MODEL_TYPES})")
        n_heads = fields.get("num_attention_heads", int)
        if fields.get("num_key_value_heads", int, n_heads) != n_heads:
            raise CheckpointError(f"{source}: num_key_value_heads must equal num_attention_heads for MLA")
        for name, expected in (("hidden_act", "silu"), ("scoring_func", "sigmoid"), ("topk_method", "noaux_tc")):
            if fields.get(name, str, expected) != expected:
                raise CheckpointError(f"{source}: {name}={d[name]!r} is not supported (expected {expected!r})")
        if fields.get("tie_word_embeddings", bool, False):
            raise CheckpointError(f"{source}: tie_word_embeddings=true is not supported (lm_head is separate)")
        kwargs = dict(
            model_type=model_type,
            vocab_size=fields.get("vocab_size", int),
            hidden_size=fields.get("hidden_size", int),
            intermediate_size=fields.get("intermediate_size", int),
            moe_intermediate_size=fields.get("moe_intermediate_size", int),
            num_hidden_layers=fields.get("num_hidden_layers", int),
            num_attention_heads=n_heads,
            q_lora_rank=fields.get("q_lora_rank", int, None),
            kv_lora_rank=fields.get("kv_lora_rank", int),
            qk_nope_head_dim=fields.get("qk_nope_head_dim", int),
            qk_rope_head_dim=fields.get("qk_rope_head_dim", int),
            v_head_dim=fields.get("v_head_dim", int),
            n_routed_experts=fields.get("n_routed_experts", int),
            n_shared_experts=fields.get("n_shared_experts", int, 1),
            num_experts_per_tok=fields.get("num_experts_per_tok", int),
            n_group=fields.get("n_group", int, 1),
            topk_group=fields.get("topk_group", int, 1),
            first_k_dense_replace=fields.get("first_k_dense_replace", int, 0),
            routed_scaling_factor=fields.get("routed_scaling_factor", float, 1.0),
            norm_topk_prob=fields.get("norm_topk_prob", bool, True),
            rms_norm_eps=fields.get("rms_norm_eps", float, 1e-6),
            max_position_embeddings=fields.get("max_position_embeddings", int),
            rope_theta=_rope_theta(d, fields),
            rope_scaling=_yarn(d, source),
            bos_token_id=fields.get("bos_token_id", int, None),
            eos_token_id=_one_or_more(d.get("eos_token_id"), f"{source}: field 'eos_token_id'"),
            num_nextn_predict_layers=fields.get("num_nextn_predict_layers", int, 0),
            fp8_block=_fp8_block(d, source),
        )
        try:
            return cls(**kwargs)
        except CheckpointError as e:  # a consistency check of __post_init__: say which file
            raise CheckpointError(f"{source}: {e}") from None


class _Fields:
    """Typed access to config fields with errors that name the file and the field."""

    _MISSING = object()

    def __init__(self, d: dict[str, Any], source: str) -> None:
        self.d, self.source = d, source

    def get(self, name: str, kind: type, default: Any = _MISSING) -> Any:
        value = self.d.get(name)
        if value is None:
            if default is self._MISSING:
                raise CheckpointError(f"{self.source}: required field {name!r} is missing")
            return default
        return _typed(value, kind, f"{self.source}: field {name!r}")


def _typed(value: Any, kind: type, where: str) -> Any:
    ok = {
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        bool: isinstance(value, bool),
        str: isinstance(value, str),
    }[kind]
    if not ok:
        raise CheckpointError(f"{where} should be {kind.__name__}, got {value!r}")
    return kind(value)


def read_json_object(file: Path) -> dict[str, Any]:
    """A checkpoint's JSON file (config.json, generation_config.json) as a dict, or a ``CheckpointError`` naming it."""
    try:
        d = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}: unreadable {file.name} ({e})") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{file}: {file.name} is not a JSON object")
    return d


def token_ids(value: int | tuple[int, ...] | list[int] | None) -> tuple[int, ...]:
    """One token id, a list of them or None, as a tuple."""
    if value is None:
        return ()
    return (value,) if isinstance(value, int) else tuple(value)


def parse_token_ids(value: Any, where: str) -> tuple[int, ...]:
    """A token-id field of a checkpoint's JSON file (config.json's or generation_config.json's ``eos_token_id``):
    absent (None), one id or a list of ids, as a tuple; a ``CheckpointError`` naming ``where`` for anything else."""
    values = [] if value is None else value if isinstance(value, list) else [value]
    for v in values:
        if _typed(v, int, where) < 0:
            raise CheckpointError(f"{where} should be a token id (>= 0), got {v!r}")
    return tuple(values)


def _one_or_more(value: Any, where: str) -> int | tuple[int, ...] | None:
    """A token-id field as config.json gives it: None, one id, or a list (kept as a tuple: ModelArgs is frozen)."""
    ids = parse_token_ids(value, where)
    return ids if isinstance(value, list) else value


def _rope_section(d: dict[str, Any]) -> dict[str, Any] | None:
    """The RoPE dict of either dialect (``rope_parameters`` wins: transformers 5 writes both keys' content)."""
    section = d.get("rope_parameters") or d.get("rope_scaling")
    return section if isinstance(section, dict) else None


def _rope_theta(d: dict[str, Any], fields: _Fields) -> float:
    section = _rope_section(d) or {}
    if "rope_theta" in section:
        return _typed(section["rope_theta"], float, f"{fields.source}: field 'rope_parameters.rope_theta'")
    return fields.get("rope_theta", float, 10000.0)


def _yarn(d: dict[str, Any], source: str) -> YarnScaling | None:
    section = _rope_section(d)
    if section is None:
        return None
    kind = section.get("rope_type", section.get("type", "default"))
    if kind == "default":
        return None
    if kind != "yarn":
        raise CheckpointError(f"{source}: rope type {kind!r} is not supported (expected 'yarn' or none)")

    def num(name: str, default: float | None = None) -> float:
        if section.get(name) is None:
            if default is None:
                raise CheckpointError(f"{source}: yarn field {name!r} is missing")
            return default
        return _typed(section[name], float, f"{source}: yarn field {name!r}")

    return YarnScaling(
        factor=num("factor"),
        original_max_position_embeddings=int(num("original_max_position_embeddings")),
        beta_fast=num("beta_fast", 32.0),
        beta_slow=num("beta_slow", 1.0),
        mscale=num("mscale", 0.0),
        mscale_all_dim=num("mscale_all_dim", 0.0),
    )


def _fp8_block(d: dict[str, Any], source: str) -> tuple[int, int] | None:
    q = d.get("quantization_config")
    if q is None:
        return None
    if not isinstance(q, dict) or q.get("quant_method") != "fp8" or q.get("fmt", "e4m3") != "e4m3":
        raise CheckpointError(f"{source}: quantization_config {q!r} is not supported (expected fp8 e4m3 blocks)")
    block = q.get("weight_block_size", [128, 128])
    if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise CheckpointError(f"{source}: quantization_config.weight_block_size {block!r} is not two positive ints")
    return (block[0], block[1])
