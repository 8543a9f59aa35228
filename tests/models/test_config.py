"""ModelArgs from both config.json dialects, the derived softmax scale, and YaRN frequencies against transformers."""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from mla_runner.models.config import ModelArgs
from mla_runner.models.errors import CheckpointError
from mla_runner.models.presets import DEEPSEEK_V3_CONFIG, KIMI_K2_CONFIG, TINY_DEEPSEEK_V3_CONFIG, TINY_KIMI_K2_CONFIG
from mla_runner.models.rope import yarn_inv_freq

ALL_PRESETS = [DEEPSEEK_V3_CONFIG, KIMI_K2_CONFIG, TINY_DEEPSEEK_V3_CONFIG, TINY_KIMI_K2_CONFIG]


def rope_parameters_dialect(config: dict[str, Any]) -> dict[str, Any]:
    """transformers 5's layout: the yarn dict renamed, rope_theta moved inside, rope_type instead of type."""
    d = {k: v for k, v in config.items() if k not in ("rope_scaling", "rope_theta")}
    yarn = {k: v for k, v in config["rope_scaling"].items() if k != "type"}
    d["rope_parameters"] = {**yarn, "rope_type": "yarn", "rope_theta": config["rope_theta"]}
    return d


@pytest.mark.parametrize("config", ALL_PRESETS, ids=lambda c: f"{c['model_type']}-{c['hidden_size']}")
def test_both_dialects_give_the_same_args(config: dict[str, Any]) -> None:
    assert ModelArgs.from_dict(rope_parameters_dialect(config)) == ModelArgs.from_dict(config)


def test_config_written_by_transformers_parses_like_the_original(tmp_path: Path) -> None:
    from transformers import DeepseekV3Config

    DeepseekV3Config(**copy.deepcopy(DEEPSEEK_V3_CONFIG)).save_pretrained(tmp_path)  # it edits rope dicts in place
    written = json.loads((tmp_path / "config.json").read_text())
    assert "rope_parameters" in written and "rope_scaling" not in written
    assert ModelArgs.from_dir(tmp_path) == ModelArgs.from_dict(DEEPSEEK_V3_CONFIG)


@pytest.mark.parametrize(("config", "scale"), [(DEEPSEEK_V3_CONFIG, 0.13523378), (KIMI_K2_CONFIG, 0.13086080)])
def test_softmax_scale_of_the_real_models(config: dict[str, Any], scale: float) -> None:
    args = ModelArgs.from_dict(config)
    assert args.softmax_scale == pytest.approx(scale, abs=1e-8)
    assert (args.qk_head_dim, args.kv_cache_dim) == (192, 576)
    assert args.fp8_block == (128, 128)


def test_real_model_numbers() -> None:
    ds, kimi = ModelArgs.from_dict(DEEPSEEK_V3_CONFIG), ModelArgs.from_dict(KIMI_K2_CONFIG)
    assert (ds.num_attention_heads, ds.n_routed_experts, ds.n_group, ds.topk_group) == (128, 256, 8, 4)
    assert (kimi.num_attention_heads, kimi.n_routed_experts, kimi.n_group, kimi.topk_group) == (64, 384, 1, 1)
    assert (ds.bos_token_id, ds.eos_token_id, kimi.bos_token_id, kimi.eos_token_id) == (0, 1, 163584, 163585)
    assert not ds.is_moe_layer(2) and ds.is_moe_layer(3) and kimi.is_moe_layer(1)


def test_no_rope_scaling() -> None:
    args = ModelArgs.from_dict({k: v for k, v in DEEPSEEK_V3_CONFIG.items() if k != "rope_scaling"})
    assert args.rope_scaling is None
    assert args.softmax_scale == 192**-0.5
    assert ModelArgs.from_dict({**DEEPSEEK_V3_CONFIG, "rope_scaling": None}) == args
    default_rope = {"rope_type": "default", "rope_theta": 10000}
    default = {**DEEPSEEK_V3_CONFIG, "rope_scaling": None, "rope_parameters": default_rope}
    assert ModelArgs.from_dict(default) == args


@pytest.mark.parametrize("config", ALL_PRESETS, ids=lambda c: f"{c['model_type']}-{c['hidden_size']}")
def test_yarn_frequencies_match_transformers(config: dict[str, Any]) -> None:
    from transformers import DeepseekV3Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = DeepseekV3Config(**{**copy.deepcopy(config), "model_type": "deepseek_v3"})
    expected, attention_factor = ROPE_INIT_FUNCTIONS["yarn"](hf, "cpu")
    args = ModelArgs.from_dict(config)
    assert attention_factor == 1.0  # mscale == mscale_all_dim: cos/sin unscaled
    torch.testing.assert_close(yarn_inv_freq(args.qk_rope_head_dim, args.rope_theta, args.rope_scaling), expected)


@pytest.mark.parametrize(("mscale", "mscale_all_dim"),
                         [(1.0, 1.0), (1.0, 0.5), (0.707, None), (None, 0.5), (None, None)])
def test_yarn_temperature_matches_transformers(mscale: float | None, mscale_all_dim: float | None) -> None:
    """Where the YaRN temperature goes (softmax scale vs cos/sin) for other mscale settings, as transformers."""
    from transformers import DeepseekV3Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention

    yarn = {**DEEPSEEK_V3_CONFIG["rope_scaling"], "mscale": mscale, "mscale_all_dim": mscale_all_dim}
    config = {**DEEPSEEK_V3_CONFIG, "rope_scaling": {k: v for k, v in yarn.items() if v is not None}}
    hf = DeepseekV3Config(**copy.deepcopy(config))
    args = ModelArgs.from_dict(config)
    assert args.rope_scaling.cos_sin_scale == pytest.approx(ROPE_INIT_FUNCTIONS["yarn"](hf, "cpu")[1])
    with torch.device("meta"):
        assert args.softmax_scale == pytest.approx(DeepseekV3Attention(hf, layer_idx=0).scaling)


def test_yarn_blends_only_inside_the_correction_range() -> None:
    """DeepSeek-V3: frequencies 0..9 kept, 24..31 divided by 40, a ramp in between (range [10, 23])."""
    args = ModelArgs.from_dict(DEEPSEEK_V3_CONFIG)
    plain = yarn_inv_freq(64, args.rope_theta, None)
    ratio = plain / yarn_inv_freq(64, args.rope_theta, args.rope_scaling)
    torch.testing.assert_close(ratio[:11], torch.ones(11))
    torch.testing.assert_close(ratio[23:], torch.full((9,), 40.0))
    assert ((ratio[11:23] > 1) & (ratio[11:23] < 40)).all()


@pytest.mark.parametrize(
    ("change", "culprit"),
    [
        ({"model_type": "llama"}, "'llama'"),
        ({"hidden_size": None}, "'hidden_size'"),
        ({"hidden_size": "7168"}, "'hidden_size'"),
        ({"num_key_value_heads": 1}, "num_key_value_heads"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"tie_word_embeddings": True}, "tie_word_embeddings"),
        ({"n_group": 3}, "n_group=3"),
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "'linear'"),
        ({"rope_scaling": {"type": "yarn"}}, "'factor'"),
        ({"quantization_config": {"quant_method": "awq"}}, "quantization_config"),
    ],
)
def test_bad_configs_name_the_field(change: dict[str, Any], culprit: str) -> None:
    with pytest.raises(CheckpointError, match=f"my/config.json: .*{culprit}"):
        ModelArgs.from_dict({**DEEPSEEK_V3_CONFIG, **change}, source="my/config.json")



def test_eos_token_id_as_one_id_or_a_list() -> None:
    one = ModelArgs.from_dict(TINY_DEEPSEEK_V3_CONFIG)
    several = ModelArgs.from_dict({**TINY_DEEPSEEK_V3_CONFIG, "eos_token_id": [1, 7]})
    assert (one.eos_token_ids, several.eos_token_ids) == ((1,), (1, 7))
    with pytest.raises(CheckpointError, match="field 'eos_token_id' should be int"):
        ModelArgs.from_dict({**TINY_DEEPSEEK_V3_CONFIG, "eos_token_id": [1, "x"]})
