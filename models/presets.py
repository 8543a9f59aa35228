"""config.json dicts of the real models (as published) and of the tiny test models derived from them.

The real ones drive the random-weight benchmark and the softmax-scale tests; the tiny ones are written to disk by
``models.tiny`` in exactly the real format. Tiny dims are chosen so that every FP8 weight has partial 128x128
blocks (hidden 200, intermediate 136), YaRN changes frequencies at short range (original context 128, factor
40/32) and routing stays well posed (n_routed_experts / n_group >= 2, small correction bias).

Treat these dicts as read-only: deep-copy one before handing it to code that edits it (transformers' config
classes rewrite the rope dict in place).
"""
from __future__ import annotations

from typing import Any

_FP8 = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}
_AUTO_MAP = {
    "AutoConfig": "configuration_deepseek.DeepseekV3Config",
    "AutoModel": "modeling_deepseek.DeepseekV3Model",
    "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM",
}

DEEPSEEK_V3_CONFIG: dict[str, Any] = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "auto_map": _AUTO_MAP,
    "aux_loss_alpha": 0.001,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "ep_size": 1,
    "first_k_dense_replace": 3,
    "hidden_act": "silu",
    "hidden_size": 7168,
    "initializer_range": 0.02,
    "intermediate_size": 18432,
    "kv_lora_rank": 512,
    "max_position_embeddings": 163840,
    "model_type": "deepseek_v3",
    "moe_intermediate_size": 2048,
    "moe_layer_freq": 1,
    "n_group": 8,
    "n_routed_experts": 256,
    "n_shared_experts": 1,
    "norm_topk_prob": True,
    "num_attention_heads": 128,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 61,
    "num_key_value_heads": 128,
    "num_nextn_predict_layers": 1,
    "pretraining_tp": 1,
    "q_lora_rank": 1536,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "quantization_config": _FP8,
    "rms_norm_eps": 1e-06,
    "rope_scaling": {
        "beta_fast": 32,
        "beta_slow": 1,
        "factor": 40,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 4096,
        "type": "yarn",
    },
    "rope_theta": 10000,
    "routed_scaling_factor": 2.5,
    "scoring_func": "sigmoid",
    "seq_aux": True,
    "tie_word_embeddings": False,
    "topk_group": 4,
    "topk_method": "noaux_tc",
    "torch_dtype": "bfloat16",
    "transformers_version": "4.33.1",
    "use_cache": True,
    "v_head_dim": 128,
    "vocab_size": 129280,
}

KIMI_K2_CONFIG: dict[str, Any] = {
    **DEEPSEEK_V3_CONFIG,
    "bos_token_id": 163584,
    "eos_token_id": 163585,
    "first_k_dense_replace": 1,
    "max_position_embeddings": 131072,
    "model_type": "kimi_k2",
    "n_group": 1,
    "n_routed_experts": 384,
    "num_attention_heads": 64,
    "num_key_value_heads": 64,
    "num_nextn_predict_layers": 0,
    "rope_scaling": {
        "beta_fast": 1.0,
        "beta_slow": 1.0,
        "factor": 32.0,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 4096,
        "type": "yarn",
    },
    "rope_theta": 50000.0,
    "routed_scaling_factor": 2.827,
    "topk_group": 1,
    "transformers_version": "4.48.3",
    "vocab_size": 163840,
}

_TINY_DIMS: dict[str, Any] = {
    "hidden_size": 200,
    "intermediate_size": 136,
    "moe_intermediate_size": 48,
    "num_hidden_layers": 3,
    "first_k_dense_replace": 1,
    "q_lora_rank": 72,
    "kv_lora_rank": 32,
    "qk_nope_head_dim": 16,
    "qk_rope_head_dim": 8,
    "v_head_dim": 16,
    "num_experts_per_tok": 2,
    "vocab_size": 512,
}

TINY_DEEPSEEK_V3_CONFIG: dict[str, Any] = {
    **DEEPSEEK_V3_CONFIG,
    **_TINY_DIMS,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
    "n_routed_experts": 8,
    "n_group": 2,
    "topk_group": 1,
    "max_position_embeddings": 5120,  # = 128 * factor 40, as transformers' YaRN expects
    "rope_scaling": {**DEEPSEEK_V3_CONFIG["rope_scaling"], "original_max_position_embeddings": 128},
}

TINY_KIMI_K2_CONFIG: dict[str, Any] = {
    **KIMI_K2_CONFIG,
    **_TINY_DIMS,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "n_routed_experts": 12,
    "bos_token_id": 510,
    "eos_token_id": 511,
    "max_position_embeddings": 4096,  # = 128 * factor 32
    "rope_scaling": {**KIMI_K2_CONFIG["rope_scaling"], "original_max_position_embeddings": 128},
}
