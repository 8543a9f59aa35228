"""``model.depth``: layers past the truncation repeat the last kept layer of their kind over the same tensors, each
with its own KV cache; a full-depth benchmark in a truncation's memory."""
from __future__ import annotations

import pytest
import torch

from mla_runner.compose import compose_config
from mla_runner.engine import LLMEngine
from mla_runner.errors import ConfigError
from mla_runner.models.deepseek_v3 import prepare_layer
from mla_runner.sampling import SamplingParams

BASE = ["model=tiny_deepseek_v3", "dtype=float32", "device=cpu", "attention=torch", "weights=bf16",
        "progress=false", "page_size=16", "max_model_len=96", "max_batch_size=4"]
PROMPTS = [[5, 17, 3, 99, 42, 7, 250], [11] * 23, [400, 2]]


def _greedy(engine: LLMEngine) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    reqs = [engine.make_request(i, p, params) for i, p in enumerate(PROMPTS)]
    return [r.output_token_ids for r in engine.run(reqs, progress=False)]


def test_repeated_layers_generate_what_copied_weights_do():
    """The tiny model's two first layers (one dense, one MoE) repeated to its three equal, token for token, the
    three-layer model whose layer 2 was given layer 1's weights: the copy runs its own attention over its own cache."""
    deep = LLMEngine(compose_config([*BASE, "model.num_layers=2", "model.depth=3"]))
    layers = deep.runner.model.model.layers
    assert len(layers) == 3 and deep.args.num_hidden_layers == 3 and len(deep.runner.kv.cache) == 3
    assert layers[2] is not layers[1] and layers[2].self_attn is not layers[1].self_attn
    assert layers[2].self_attn.kv_b_proj.weight is layers[1].self_attn.kv_b_proj.weight
    assert layers[2].self_attn.w_uk is layers[1].self_attn.w_uk  # derived weights shared too
    assert layers[1].self_attn.input_projections_fused and layers[2].self_attn.input_projections_fused
    assert len({layer.self_attn.kv_cache.data_ptr() for layer in layers}) == 3

    full = LLMEngine(compose_config(BASE))
    ref = full.runner.model.model.layers
    with torch.no_grad():
        ref[2].load_state_dict(ref[1].state_dict())
        prepare_layer(ref[2])
    expected = _greedy(full)
    assert all(len(t) == 12 for t in expected)
    assert _greedy(deep) == expected


@pytest.mark.parametrize("overrides,message", [
    (["model.depth=3"], "set model.num_layers below it"),
    (["model.num_layers=2", "model.depth=2"], "set model.num_layers below it"),
    (["model.num_layers=2", "model.depth=4"], "more than the model's 3 layers"),
    (["model.num_layers=1", "model.depth=3"], "keep at least 2"),
])
def test_bad_depths_are_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        LLMEngine(compose_config([*BASE, *overrides]))
