"""On a GPU: the CUDA-graphed decode step equals eager execution on full-width truncated models (its sampling, in
the decode sampler's graph, equals ``sample`` on the same logits), so do the graphed verify and MTP drafting steps of
speculative decoding with per-request q_lens that change every replay, steps with prompt chunks as piecewise graphs
equal the same steps eager, and the fused MoE in the model equals the expert loop."""
from __future__ import annotations

import gc

import pytest
import torch

from mla_runner.compose import compose_config
from mla_runner.engine import LLMEngine
from mla_runner.engine.sampler import DrawKeys, sample
from mla_runner.engine.scheduler import ScheduledBatch
from mla_runner.sampling import SamplingParams
from mla_runner.tasks.bench import fill_running

pytestmark = pytest.mark.gpu
SETTINGS = [SamplingParams(temperature=0), SamplingParams(temperature=0.8, top_p=0.9, seed=1),
            SamplingParams(temperature=0, repetition_penalty=1.2, frequency_penalty=0.3),
            SamplingParams(temperature=1.0, top_k=20, min_p=0.02, presence_penalty=0.4),
            SamplingParams(temperature=1.0)]


@pytest.mark.parametrize("model,layers", [("deepseek_v3", 4), ("kimi_k2", 2)])
def test_graph_replay_equals_eager_full_width(model, layers):
    cfg = compose_config([f"model={model}", "model.random_weights=true", f"model.num_layers={layers}",
                          "attention=triton", "metadata=persistent", "dtype=bfloat16", "device=cuda",
                          "max_batch_size=16", "max_model_len=8192", "progress=false"])
    engine = LLMEngine(cfg)
    runner = engine.runner
    assert runner.graphs is not None
    # 5 requests (padded to the bucket of 8) of uneven lengths, one long among short ones, each its own sampling
    batch = fill_running(engine, [4000, 17, 1, 640, 129], max_tokens=8)
    for req, params in zip(batch, SETTINGS):
        req.params = params
    for _ in range(3):  # new lengths every replay: each step appends a token to every request
        for req in batch:
            engine.scheduler.blocks.allocate(req, req.num_computed + 1)
        graph_logits = runner.decode_logits(batch).clone()
        # the decode sampler's graph (reading the step graph's logits) draws what sample() draws from them
        tokens, _ = runner._sample(graph_logits, batch, decode=True, graphed=True)
        keys = DrawKeys([runner._seed(r) for r in batch], [len(r.output_token_ids) for r in batch])
        expected = sample(graph_logits, [r.params for r in batch], keys, [r.prompt_token_ids for r in batch],
                          [r.output_token_ids for r in batch])
        assert tokens == expected.tokens.tolist()
        # the same (padded) buffers, eager: the same bucket, so the same work plan
        eager_logits = runner._decode_forward(runner.graphs.bucket(len(batch)))[: len(batch)]
        err = (graph_logits - eager_logits).abs().max() / eager_logits.abs().max()
        assert err < 1e-5, err
        assert torch.equal(graph_logits.argmax(-1), eager_logits.argmax(-1))
        for req, token in zip(batch, tokens):
            req.num_computed = req.num_tokens
            req.output_token_ids.append(token)
    assert runner.decode_sampler.num_graphs == 1  # one bucket, one combination of steps
    del engine, runner, batch
    gc.collect()  # the runner and its graphs' step functions refer to each other
    torch.cuda.empty_cache()


def test_verify_and_draft_graphs_equal_eager_with_changing_q_lens():
    """DeepSeek-V3 widths with the MTP layer, k = 3: five requests (bucket 8) verify 0-3 drafts each, a different mix
    every step, so the graph of (8, Q) replays with new q_lens and lengths; its logits and hidden states, and the
    drafting graph's drafts, equal the same step run eagerly over the same padded buffers (the same work plan)."""
    cfg = compose_config(["model=deepseek_v3", "model.random_weights=true", "model.num_layers=4", "attention=triton",
                          "metadata=persistent", "dtype=bfloat16", "device=cuda", "max_batch_size=16",
                          "max_model_len=8192", "progress=false", "speculative=mtp", "speculative.num_tokens=3"])
    engine = LLMEngine(cfg)
    runner = engine.runner
    assert runner.use_graphs and runner.graphs is None and runner.verify_step.graphs is not None
    batch = fill_running(engine, [4000, 17, 1, 640, 129], max_tokens=64)
    gen = torch.Generator().manual_seed(0)
    mixes = [[3, 0, 2, 1, 3], [1, 1, 1, 1, 1], [0, 3, 3, 0, 2], [2, 2, 0, 3, 1]]
    for step, drafts in enumerate(mixes):
        for req, d in zip(batch, drafts):
            req.draft_token_ids = torch.randint(0, engine.args.vocab_size, (d,), generator=gen).tolist()
            engine.scheduler.blocks.allocate(req, req.num_computed + 1 + d)
        num_new = [1 + d for d in drafts]
        T, Q = sum(num_new), max(num_new)
        with torch.inference_mode():
            graph_logits = runner._verify_logits(batch, num_new).clone()
            graph_hidden = runner.verify_step.hidden[:T].clone()
            eager_logits = runner.verify_step.forward(8, 8 * Q, Q)[:T]
        err = (graph_logits - eager_logits).abs().max() / eager_logits.abs().max()
        assert err < 1e-5, (step, err)
        assert torch.equal(graph_hidden, runner.verify_step.hidden[:T])
        # the emitted tokens: the target's argmax at 1 + (step % 2) rows of each request (drafts "accepted" or not)
        argmax = graph_logits.argmax(-1).tolist()
        starts = [sum(num_new[:b]) for b in range(len(batch))]
        emitted = [argmax[s : s + min(n, 1 + step % 2)] for s, n in zip(starts, num_new)]
        rooms = [3, 2, 3, 1, 0]
        positions = [r.num_computed for r in batch]
        with torch.inference_mode():
            graph_drafts = runner.draft_step.draft(batch, positions, num_new, emitted, rooms)
            eager_drafts = runner.draft_step.forward(8, 8 * Q, Q)[: len(batch)].tolist()
        assert graph_drafts == [row[:room] for row, room in zip(eager_drafts, rooms)], step
        for req, out in zip(batch, emitted):
            req.output_token_ids += out
            req.num_computed += len(out)
            req.draft_token_ids = []
            engine.scheduler.blocks.trim(req, req.num_tokens)
    assert len(runner.verify_step.graphs) == len({max(m) + 1 for m in mixes})
    del engine, runner, batch
    gc.collect()  # the runner and its graphs' step functions refer to each other
    torch.cuda.empty_cache()


def test_piecewise_steps_equal_eager_full_width():
    """DeepSeek-V3 widths, FP8 weights: three decodes beside a prompt chunk in each of its forms (no context,
    non-absorbed; a short chunk after a long context, absorbed; a long chunk after a context slice), in buckets of 64,
    64 and 2048 tokens: the piecewise graphs' logits (captured on first use, then replayed) equal the eager step's."""
    cfg = compose_config(["model=deepseek_v3", "model.random_weights=true", "model.num_layers=4", "weights=fp8",
                          "attention=triton", "metadata=persistent", "dtype=bfloat16", "device=cuda",
                          "max_batch_size=16", "max_model_len=8192", "progress=false", "piecewise_cuda_graphs=true"])
    engine = LLMEngine(cfg)
    step = engine.runner.eager_step
    piecewise = step.piecewise
    assert piecewise is not None
    reqs = fill_running(engine, [4000, 17, 640, 3000], max_tokens=8)
    decodes, chunk = reqs[:3], reqs[3]
    for req in decodes:
        engine.scheduler.blocks.allocate(req, req.num_computed + 1)
    forms, build = [], step.chunk_metadata

    def record_form(*args):
        meta = build(*args)
        forms.append(meta.absorbed is not None)
        return meta

    step.chunk_metadata = record_form
    for context, n in [(0, 61), (2900, 40), (1000, 1400)]:
        chunk.num_computed = context
        batch = ScheduledBatch([*decodes, chunk], [1, 1, 1, n])
        assert piecewise.bucket(batch.num_tokens) is not None
        with torch.inference_mode():
            captured = step.logits(batch)[0].clone()
            replayed = step.logits(batch)[0].clone()
            step.piecewise = None
            eager = step.logits(batch)[0].clone()
            step.piecewise = piecewise
        assert torch.equal(captured, replayed), (context, n)
        err = (captured - eager).abs().max() / eager.abs().max()
        assert err < 2e-2, (context, n, err)
    assert forms[::3] == [False, True, False]
    assert len(piecewise.graphs) == 2 * (len(engine.runner.model.model.layers) + 1)  # buckets 64 and 2048
    del engine
    gc.collect()
    torch.cuda.empty_cache()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_moe_in_the_model_equals_the_expert_loop(dtype):
    from mla_runner.models.config import ModelArgs
    from mla_runner.models.moe import MoE
    from mla_runner.models.presets import DEEPSEEK_V3_CONFIG
    from mla_runner.models.random_weights import random_model

    # DeepSeek-V3 widths, one MoE layer with 64 of its 256 experts (memory)
    args = ModelArgs.from_dict({**DEEPSEEK_V3_CONFIG, "num_hidden_layers": 1, "first_k_dense_replace": 0,
                                "n_routed_experts": 64})
    model = random_model(args, dtype=dtype, device="cuda")
    moe = model.model.layers[0].mlp
    assert isinstance(moe, MoE)
    x = torch.randn(37, args.hidden_size, device="cuda", dtype=dtype)
    fused = moe(x)
    weights, ids = moe.gate(x)
    loop = moe.routed(x, weights, ids).to(dtype) + moe.shared_experts(x)
    err = (fused.float() - loop.float()).norm() / loop.float().norm()
    assert err < (1e-4 if dtype == torch.float32 else 2e-2), err
