"""End to end through ``LLM``: batched greedy generation equals transformers token for token, on both tiny
flavours, with every attention backend and metadata strategy; a cache too small for all requests at once
still completes every request (through preemption) with the same tokens."""
from __future__ import annotations

from pathlib import Path

import pytest

from mla_runner import LLM, SamplingParams
from mla_testing import INTERPRETER
from mla_testing.oracle import oracle_greedy, random_prompts

# Mixed prompt lengths (1 to 250 tokens) and different max_tokens, all in one generate call.
PROMPT_LENGTHS = (1, 7, 33, 250)
MAX_TOKENS = (6, 3, 5, 4)


def prompts_for(vocab: int, eos: int) -> list[list[int]]:
    return random_prompts(vocab, eos, PROMPT_LENGTHS)


@pytest.fixture(scope="module", params=["dsv3", "kimi"])
def flavour(request):
    ckpt: Path = request.getfixturevalue(f"{request.param}_ckpt")
    oracle = request.getfixturevalue(f"{request.param}_oracle")
    eos = oracle.config.eos_token_id
    prompts = prompts_for(oracle.config.vocab_size, eos)
    expected = [oracle_greedy(oracle, p, m, eos) for p, m in zip(prompts, MAX_TOKENS)]
    return ckpt, prompts, expected


def generate(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    params = [SamplingParams(temperature=0.0, max_tokens=m) for m in MAX_TOKENS]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for out, m in zip(outs, MAX_TOKENS):
        assert out.outputs[0].finish_reason == ("length" if len(out.outputs[0].token_ids) == m else "stop")
    return [out.outputs[0].token_ids for out in outs]


GPU = pytest.param("cuda", marks=pytest.mark.gpu)
# Triton kernels on a CPU need the interpreter, which is on only on machines without a GPU.
CPU = pytest.param("cpu", marks=pytest.mark.skipif(not INTERPRETER, reason="Triton on a CPU needs its interpreter"))


@pytest.mark.parametrize("device", [CPU, GPU])
@pytest.mark.parametrize("attention,metadata", [("torch", "persistent"), ("torch", "per_step"),
                                                ("triton", "persistent"), ("triton", "per_step")])
def test_batched_greedy_equals_transformers(flavour, attention, metadata, device):
    """On a GPU, triton + persistent runs its decode steps as CUDA-graph replays."""
    ckpt, prompts, expected = flavour
    llm = LLM(str(ckpt), attention=attention, metadata=metadata, dtype="float32", device=device, page_size=16,
              max_model_len=280, max_batch_size=8, progress=False)
    assert (llm.engine.runner.graphs is not None) == (device == "cuda" and (attention, metadata) == ("triton",
                                                                                                 "persistent"))
    assert generate(llm, prompts) == expected


@pytest.mark.skipif(not INTERPRETER, reason="Triton on a CPU needs its interpreter")
@pytest.mark.parametrize("attention", ["torch", "triton"])
def test_one_at_a_time_and_preemption_give_the_same_tokens(flavour, attention, request):
    if attention == "triton" and request.node.callspec.params["flavour"] == "kimi":
        pytest.skip("the interpreter takes long: one flavour through Triton (both through torch)")
    ckpt, prompts, expected = flavour
    one = LLM(str(ckpt), attention=attention, dtype="float32", device="cpu", page_size=16, max_batch_size=1,
              max_model_len=280, progress=False)
    assert generate(one, prompts) == expected
    # The four prompts take all 75 pages of 4 tokens at admission (1 + 2 + 9 + 63): the first decode step
    # that crosses a page boundary preempts the newest request, which is recomputed later.
    tight = LLM(str(ckpt), attention=attention, dtype="float32", device="cpu", page_size=4, num_pages=75,
                max_model_len=280, progress=False)
    assert generate(tight, prompts) == expected
    assert tight.engine.scheduler.num_preemptions > 0


@pytest.fixture(scope="module", params=["dsv3", "kimi"])
def shared_flavour(request):
    """Prompts that share prefixes (of whole pages and not), one repeated, one of a single token, with transformers'
    greedy continuations."""
    ckpt: Path = request.getfixturevalue(f"{request.param}_ckpt")
    oracle = request.getfixturevalue(f"{request.param}_oracle")
    eos = oracle.config.eos_token_id
    short, mid, long = (prompts_for(oracle.config.vocab_size, eos)[i] for i in (1, 2, 3))
    prompts = [long, long[:120] + short, long[:64] + mid, [long[0]], list(long), long[:37] + short]
    max_tokens = [4, 3, 5, 3, 4, 2]
    expected = [oracle_greedy(oracle, p, m, eos) for p, m in zip(prompts, max_tokens)]
    return request.param, ckpt, prompts, max_tokens, expected


def generate_each(llm: LLM, prompts: list[list[int]], max_tokens: list[int]):
    params = [SamplingParams(temperature=0.0, max_tokens=m) for m in max_tokens]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [out.outputs[0].token_ids for out in outs], outs


@pytest.mark.parametrize("device", ["cpu", GPU])
@pytest.mark.parametrize("attention", ["torch", "triton"])
@pytest.mark.parametrize("prefix_caching", [True, False])
def test_chunked_prefill_and_prefix_caching_equal_transformers(shared_flavour, attention, prefix_caching, device):
    """A budget of 16 tokens a step (32 for the interpreter): prompts of up to 250 tokens go in chunks, decodes
    share steps with them, chunk boundaries fall inside pages; with prefix caching, later prompts start from the
    pages earlier ones filled. The Triton kernels under the interpreter take long: one case of them on the CPU (the
    GPU runs them all)."""
    name, ckpt, prompts, max_tokens, expected = shared_flavour
    if device == "cpu" and attention == "triton":
        if not INTERPRETER:
            pytest.skip("Triton on a CPU needs its interpreter")
        if (name, prefix_caching) != ("dsv3", True):
            pytest.skip("one Triton case on the CPU")
    budget = 32 if (device, attention) == ("cpu", "triton") else 16  # fewer interpreted steps, chunks all the same
    llm = LLM(str(ckpt), attention=attention, dtype="float32", device=device, page_size=8, max_model_len=280,
              max_batch_size=4, max_num_batched_tokens=budget, enable_prefix_caching=prefix_caching, progress=False)
    runner, forms = llm.engine.runner, []
    build = runner.eager_step.chunk_metadata

    def record_form(*args):
        meta = build(*args)
        forms.append("absorbed" if meta.absorbed is not None else "non-absorbed")
        return meta

    runner.eager_step.chunk_metadata = record_form
    tokens, outs = generate_each(llm, prompts, max_tokens)
    assert tokens == expected
    # first chunks (no context) run non-absorbed; at the tiny widths a chunk of 16-32 tokens after as many cached ones
    # is cheaper absorbed
    assert set(forms) == {"absorbed", "non-absorbed"}
    cached = [out.num_cached_tokens for out in outs]
    if prefix_caching:  # at most 4 running: the 5th and 6th prompts find the pages of the 1st
        assert cached[4] == 248 and cached[5] == 32, cached
    else:
        assert cached == [0] * len(prompts)


@pytest.mark.parametrize("device", ["cpu", GPU])
def test_piecewise_steps_equal_transformers(shared_flavour, device):
    """Steps with prompt chunks through ``PiecewiseForward``: at most 16 tokens a step, each replaying the bucket of
    64 (its padding rows included), and the tokens are transformers'. On a GPU the pieces are captured graphs around
    the Triton attention; on a CPU they run as they are, over the same buffers."""
    from mla_runner.engine.piecewise import PiecewiseForward

    _, ckpt, prompts, max_tokens, expected = shared_flavour
    llm = LLM(str(ckpt), attention="torch" if device == "cpu" else "triton", dtype="float32", device=device,
              page_size=8, max_model_len=280, max_batch_size=4, max_num_batched_tokens=16, progress=False,
              piecewise_cuda_graphs=True)
    runner = llm.engine.runner
    if device == "cpu":
        assert runner.eager_step.piecewise is None  # graphs only where they run
        runner.eager_step.piecewise = PiecewiseForward(runner.model, runner.kv.scratch_slot, runner.device,
                                                       runner.dtype, graphs=False)
    piecewise, sizes = runner.eager_step.piecewise, []
    forward = piecewise.forward

    def counted(input_ids, ctx):
        sizes.append(input_ids.shape[0])
        return forward(input_ids, ctx)

    piecewise.forward = counted
    assert generate_each(llm, prompts, max_tokens)[0] == expected
    assert len(sizes) > 10 and max(sizes) <= 16
    if device != "cpu":
        assert len(piecewise.graphs) == len(runner.model.model.layers) + 1  # one bucket's pieces


def test_prefix_caching_under_preemption_equals_transformers(shared_flavour):
    _, ckpt, prompts, max_tokens, expected = shared_flavour
    llm = LLM(str(ckpt), attention="torch", dtype="float32", device="cpu", page_size=4, num_pages=80,
              max_model_len=280, max_num_batched_tokens=32, progress=False)
    assert generate_each(llm, prompts, max_tokens)[0] == expected
    assert llm.engine.scheduler.num_preemptions > 0
