"""DeepSeek-V3 / Kimi-K2 (one architecture): model code, checkpoint loader and tiny-checkpoint maker.

- ``config``: ``ModelArgs`` from config.json (both RoPE dialects); ``presets``: the real and tiny config dicts.
- ``deepseek_v3`` (+ ``mla``, ``moe``, ``rope``, ``layers``): ``DeepseekV3ForCausalLM``.
- ``loader``: ``load_model`` / ``load_tokenizer``; ``fp8``: block (de)quantization; ``errors``: user errors.
- ``tiny`` (+ ``tiny_tokenizer``): deterministic tiny checkpoints in the real on-disk format.
- ``context``: the per-step forward context and the attention-backend protocol.
"""
