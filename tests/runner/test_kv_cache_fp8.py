"""The FP8 latent KV cache through the runner (``kv_cache_dtype=fp8|fp8_ds_mla``).

The reference is transformers' model (the oracle of tests/runner/test_e2e.py) with its latent passed through the
same quantization before attention: the normalized c_kv and the rotated k_pe of every token quantized and dequantized
by ``kernels.kv_cache.quantize_reference`` / ``dequantize_reference`` (torch's casts, nothing shared with the write
and read kernels). The runner attends every key as its cache holds it, so greedy generation equals that reference
token for token, whatever the chunking, prefix-cache hits and preemptions; against the unquantized model the prompt
distributions stay within the tolerance stated below.
"""
from __future__ import annotations

import contextlib
import math
from pathlib import Path

import pytest
import torch

from mla_runner import LLM, SamplingParams
from mla_runner.engine.kv_cache import kv_cache_pages
from mla_runner.errors import ConfigError
from mla_runner.kernels.kv_cache import KVCacheLayout, dequantize_reference, quantize_reference
from mla_testing import INTERPRETER
from mla_testing.oracle import oracle_greedy, random_prompts

PROMPT_LENGTHS = (1, 7, 33, 250)
MAX_TOKENS = (6, 3, 5, 4)
# the Triton case, whose kernels the interpreter runs: shorter prompts, fewer steps
TRITON_LENGTHS, TRITON_MAX_TOKENS = (1, 7, 33, 70), (4, 3, 4, 2)
SMALL_SCALE = 1 / 64  # an fp8 scale other than the default 1.0: the tiny latents (|x| < 4.5) still fit 448 * it


def prompts_for(vocab: int, eos: int, lengths=PROMPT_LENGTHS) -> list[list[int]]:
    return random_prompts(vocab, eos, lengths)


@contextlib.contextmanager
def quantized_latents(oracle, kind: str | None, scale: float = 1.0):
    """transformers' DeepseekV3 with each token's latent (kv_a_layernorm's output and the rotated k_rot) quantized to
    ``kind`` and dequantized to fp32 before attention; ``kind`` None: unchanged."""
    if kind is None:
        yield oracle
        return
    import transformers.models.deepseek_v3.modeling_deepseek_v3 as hf

    cfg = oracle.config
    R, P = cfg.kv_lora_rank, cfg.qk_rope_head_dim
    layout = KVCacheLayout(kind, R, P, torch.float32)
    scale_t = torch.tensor([scale], dtype=torch.float32) if kind == "fp8" else None

    def qdq(x: torch.Tensor, cols: slice) -> torch.Tensor:
        """The values of ``x`` [..., n] as cache columns ``cols`` of a token, quantized and dequantized (the other
        columns zero: every layout quantizes the latent and the rope parts independently)."""
        flat = x.reshape(-1, x.shape[-1]).float()
        rows = torch.zeros(flat.shape[0], R + P)
        rows[:, cols] = flat
        back = dequantize_reference(quantize_reference(rows, layout, scale_t), layout, scale_t)
        return back[:, cols].reshape(x.shape).to(x.dtype)

    handles = [layer.self_attn.kv_a_layernorm.register_forward_hook(lambda m, a, out: qdq(out, slice(0, R)))
               for layer in oracle.model.layers]
    names = ("apply_rotary_pos_emb", "apply_rotary_pos_emb_interleave")
    originals = {name: getattr(hf, name) for name in names}

    def wrap(rope):
        def rotated(q, k, *args, **kwargs):
            q, k = rope(q, k, *args, **kwargs)
            return q, qdq(k, slice(R, R + P))
        return rotated

    try:
        for name in names:
            setattr(hf, name, wrap(originals[name]))
        yield oracle
    finally:
        for h in handles:
            h.remove()
        for name in names:
            setattr(hf, name, originals[name])



def expected_greedy(oracle, prompts, max_tokens, kind, scale: float = 1.0) -> list[list[int]]:
    eos = oracle.config.eos_token_id
    with quantized_latents(oracle, kind, scale):
        return [oracle_greedy(oracle, p, m, eos) for p, m in zip(prompts, max_tokens)]


def generate(llm: LLM, prompts, max_tokens) -> tuple[list[list[int]], list]:
    params = [SamplingParams(temperature=0.0, max_tokens=m) for m in max_tokens]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [out.outputs[0].token_ids for out in outs], outs


CPU_TRITON = pytest.mark.skipif(not INTERPRETER, reason="Triton on a CPU needs its interpreter")


@pytest.mark.parametrize("flavour,attention,kind,scale", [
    ("dsv3", "torch", "fp8", None),
    ("dsv3", "torch", "fp8", SMALL_SCALE),
    ("dsv3", "torch", "fp8_ds_mla", None),
    ("kimi", "torch", "fp8_ds_mla", None),
    pytest.param("dsv3", "triton", "fp8", SMALL_SCALE, marks=CPU_TRITON),
])
def test_batched_greedy_equals_transformers_on_the_same_quantized_latents(flavour, attention, kind, scale, request):
    """Prompts of 1 to 250 tokens (70 through Triton) batched, absorbed decode steps reading the FP8 cache through the
    backend (the Triton decode kernel dequantizing in registers, or the torch reference); the fp8 scale reaches the
    write and the reads (a non-default one would give other tokens where it did not)."""
    ckpt: Path = request.getfixturevalue(f"{flavour}_ckpt")
    oracle = request.getfixturevalue(f"{flavour}_oracle")
    lengths, max_tokens = (TRITON_LENGTHS, TRITON_MAX_TOKENS) if attention == "triton" else (PROMPT_LENGTHS,
                                                                                             MAX_TOKENS)
    prompts = prompts_for(oracle.config.vocab_size, oracle.config.eos_token_id, lengths)
    expected = expected_greedy(oracle, prompts, max_tokens, kind, 1.0 if scale is None else scale)
    settings = {} if scale is None else {"kv_cache_scale": scale}
    llm = LLM(str(ckpt), attention=attention, dtype="float32", device="cpu", page_size=16, max_model_len=280,
              max_batch_size=8, kv_cache_dtype=kind, progress=False, **settings)
    runner = llm.engine.runner
    assert runner.kv.cache.dtype == {"fp8": torch.float8_e4m3fn, "fp8_ds_mla": torch.uint8}[kind]
    assert generate(llm, prompts, max_tokens)[0] == expected


@pytest.mark.parametrize("kind", ["fp8", "fp8_ds_mla"])
def test_chunked_prefill_and_prefix_hits_read_the_fp8_cache(dsv3_ckpt, dsv3_oracle, kind):
    """A budget of 32 tokens a step: prompts go in chunks (non-absorbed with their context gathered from the cache and
    dequantized, or, deep into a prompt beside decodes, absorbed through the backend), decodes share steps with them,
    later prompts start from pages that earlier ones filled. Every key is read as the cache holds it, so the tokens
    are those of the quantized reference all the same."""
    eos = dsv3_oracle.config.eos_token_id
    short, mid, long = prompts_for(dsv3_oracle.config.vocab_size, eos)[1:]
    prompts = [long, long[:120] + short, long[:64] + mid, [long[0]], list(long), long[:37] + short]
    max_tokens = [4, 3, 5, 3, 4, 2]
    expected = expected_greedy(dsv3_oracle, prompts, max_tokens, kind)
    llm = LLM(str(dsv3_ckpt), attention="torch", dtype="float32", device="cpu", page_size=8, max_model_len=280,
              max_batch_size=4, max_num_batched_tokens=32, kv_cache_dtype=kind, progress=False)
    runner, forms = llm.engine.runner, []
    build = runner.eager_step.chunk_metadata

    def record_form(*args):
        meta = build(*args)
        forms.append("absorbed" if meta.absorbed is not None else "context" if meta.context else "first")
        return meta

    runner.eager_step.chunk_metadata = record_form
    tokens, outs = generate(llm, prompts, max_tokens)
    assert tokens == expected
    assert set(forms) == {"absorbed", "context", "first"}, forms
    assert [out.num_cached_tokens for out in outs][4:] == [248, 32]


def test_preemption_recomputes_into_the_fp8_cache(dsv3_ckpt, dsv3_oracle):
    """75 pages of 4 tokens for four prompts: a decode step that crosses a page boundary preempts the newest request,
    which is recomputed later, its keys quantized again to the same bytes."""
    prompts = prompts_for(dsv3_oracle.config.vocab_size, dsv3_oracle.config.eos_token_id)
    expected = expected_greedy(dsv3_oracle, prompts, MAX_TOKENS, "fp8_ds_mla")
    tight = LLM(str(dsv3_ckpt), attention="torch", dtype="float32", device="cpu", page_size=4, num_pages=75,
                max_model_len=280, kv_cache_dtype="fp8_ds_mla", progress=False)
    assert generate(tight, prompts, MAX_TOKENS)[0] == expected
    assert tight.engine.scheduler.num_preemptions > 0


def full_prompt_logprobs(llm: LLM, prompt: list[int], vocab: int) -> torch.Tensor:
    """[len(prompt) - 1, vocab]: the log-softmax the runner computes at each prompt position but the last."""
    out = llm.generate({"prompt_token_ids": prompt}, SamplingParams(max_tokens=1, prompt_logprobs=vocab),
                       use_tqdm=False)[0]
    rows = torch.full((len(prompt) - 1, vocab), -math.inf, dtype=torch.float64)
    for i, entry in enumerate(out.prompt_logprobs[1:]):
        for token, lp in entry.items():
            rows[i, token] = lp.logprob
    return rows


@pytest.mark.parametrize("kind", ["fp8", "fp8_ds_mla"])
def test_prompt_distributions_against_the_quantized_and_the_plain_model(dsv3_ckpt, dsv3_oracle, kind):
    """Each prompt position's whole distribution (prompt logprobs of all 512 tokens; the prompt prefilled in chunks of
    32: the second and third in non-absorbed form with their context gathered from the FP8 cache, the last, of 24,
    in absorbed form through the backend): equal to the quantized reference's up to fp32 rounding (measured 3.8e-6),
    and within the stated tolerance of the unquantized model: mean KL under 0.05 nats and top-1 agreement of at
    least 80% (measured: KL 0.024 for fp8, 0.020 for fp8_ds_mla, agreement 0.92; the tiny model's distributions are
    flat, top-1 probability 2.6% on average, so a small change flips many argmaxes)."""
    vocab = dsv3_oracle.config.vocab_size
    prompt = prompts_for(vocab, dsv3_oracle.config.eos_token_id, (120,))[0]
    llm = LLM(str(dsv3_ckpt), attention="torch", dtype="float32", device="cpu", page_size=8, max_model_len=160,
              max_batch_size=2, max_num_batched_tokens=32, kv_cache_dtype=kind, progress=False)
    got = full_prompt_logprobs(llm, prompt, vocab)
    with torch.no_grad():
        with quantized_latents(dsv3_oracle, kind, 1.0):
            same = dsv3_oracle(torch.tensor([prompt])).logits[0, :-1].double().log_softmax(-1)
        plain = dsv3_oracle(torch.tensor([prompt])).logits[0, :-1].double().log_softmax(-1)
    assert (got - same).abs().max() < 1e-4
    kl = (plain.exp() * (plain - got)).sum(-1)
    agree = (plain.argmax(-1) == got.argmax(-1)).double().mean()
    assert 0 <= kl.mean() < 0.05 and agree >= 0.8, (kl.mean(), agree)


def test_fp8_fits_more_tokens_in_the_same_memory():
    """At DeepSeek-V3's widths (61 layers, pages of 64), the same free memory holds 2x the tokens in ``fp8`` and
    1152 / 656 = 1.76x in ``fp8_ds_mla`` (pages from the memory fraction, as on a GPU)."""
    free, fraction, wanted = 60 * 2**30, 0.8, 10**9

    def pages(kind: str) -> int:
        layout = KVCacheLayout(kind, 512, 64, torch.bfloat16)
        return kv_cache_pages(wanted, 61 * 64 * layout.bytes_per_token, free, fraction)

    bf16, fp8, ds = pages("auto"), pages("fp8"), pages("fp8_ds_mla")
    assert bf16 == int(free * fraction) // (61 * 64 * 1152)
    assert fp8 // 2 == bf16 and ds == int(free * fraction) // (61 * 64 * 656)
    assert ds / bf16 == pytest.approx(1152 / 656, rel=1e-3)
    assert kv_cache_pages(100, 61 * 64 * 576, free, fraction) == 100  # what max_batch_size needs, no more
    assert kv_cache_pages(100, 64, None, fraction) == 100  # a CPU: no memory cap


def test_the_runner_allocates_the_layout_and_says_so(dsv3_ckpt):
    """The cache tensor in the layout's storage dtype and width, every layer with its view and its own scale view of
    one device tensor, result.json's fields."""
    llm = LLM(str(dsv3_ckpt), attention="torch", dtype="float32", device="cpu", page_size=16, num_pages=20,
              max_model_len=64, kv_cache_dtype="fp8_e4m3", kv_cache_scale=0.5, progress=False)  # vLLM's name of fp8
    runner = llm.engine.runner
    layers = runner.model.attention_layers
    assert runner.kv.cache.shape == (len(layers), 21, 16, 40) and runner.kv.cache.dtype == torch.float8_e4m3fn
    assert runner.kv.scales.tolist() == [0.5] * len(layers)
    for i, attn in enumerate(layers):
        assert attn.kv_layout.kind == "fp8" and attn.kv_cache.data_ptr() == runner.kv.cache[i].data_ptr()
        assert attn.kv_scale.data_ptr() == runner.kv.scales[i:].data_ptr() and attn.kv_scale.shape == (1,)
    r = runner.resolved
    assert (r["kv_cache_dtype"], r["kv_cache_scale"], r["kv_bytes_per_token"]) == ("fp8", 0.5, 40 * len(layers))
    assert r["kv_tokens"] == 320
    ds = LLM(str(dsv3_ckpt), attention="torch", dtype="float32", device="cpu", page_size=16, num_pages=20,
             max_model_len=64, kv_cache_dtype="fp8_ds_mla", progress=False).engine.runner
    assert ds.kv.cache.shape[-1] == 52 and ds.kv.cache.dtype == torch.uint8 and ds.kv.scales is None
    assert (ds.resolved["kv_cache_dtype"], ds.resolved["kv_cache_scale"]) == ("fp8_ds_mla", None)
    ds.kv.randomize(ds.dtype)  # the benchmarks' filler writes the layout (finite values, power-of-two scales)
    scales = ds.kv.cache[..., 32:36].contiguous().view(torch.float32)
    assert torch.all(torch.log2(scales) == torch.log2(scales).round())


@pytest.mark.parametrize("kwargs,message", [
    ({"kv_cache_dtype": "fp8_e5m2"}, "kv_cache_dtype='fp8_e5m2' is not supported: choose one of 'auto', 'fp8'"),
    ({"kv_cache_dtype": "fp8_ds_mla", "attention": "flashmla", "device": "cuda"},
     r"^attention=flashmla needs kv_cache_dtype=auto or fp8 \(here fp8_ds_mla\); use attention=triton$"),
    ({"kv_cache_dtype": "fp8", "dtype": "float16"}, "kv_cache_dtype=fp8 needs dtype=bfloat16 or float32"),
    ({"calculate_kv_scales": True}, r"LLM\(calculate_kv_scales=...\): not supported: .*kv_cache_scale"),
])
def test_bad_kv_cache_settings_are_one_line_errors_before_loading(dsv3_ckpt, kwargs, message):
    with pytest.raises(ConfigError, match=message) as info:
        LLM(str(dsv3_ckpt), progress=False, **{"device": "cpu", **kwargs})
    assert "\n" not in str(info.value)
