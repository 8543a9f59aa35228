"""What an FP8 latent KV cache costs in accuracy: the same model and prompts with the model-dtype cache
(``kv_cache_dtype=auto``, the reference) and with each FP8 layout (docs/kv_cache_fp8.md#7-the-accuracy-harness).

Per layout, against the reference run:

- each MLA layer's output (its o_proj, over every prompt position), relative error ||o - o_ref|| / ||o_ref||:
  ``alone``, every layer fed the reference run's input (the error its own cache adds), and ``through``, the run as it
  is (the errors of the layers before it carried along);
- the final logits at every prompt position: KL(p_ref || p) in nats and top-1 agreement (the same argmax);
- greedy generation of ``--gen-len`` tokens, all prompts batched (decode steps reading the cache through the
  backend): the share of positions with the reference's token, and the first position that differs.

Layouts (``--layouts``): ``fp8`` (per-tensor scale ``kv_cache_scale``, 1.0 unless overridden), ``fp8_calibrated``
(``fp8`` with each layer's scale set to the largest latent magnitude the reference run wrote there, over 448),
``fp8_ds_mla``, and ``auto``: the reference layout again, a control that must give zero error, KL 0 and full
agreement wherever the run is deterministic. The prompts are random token ids (random-weight models have no
tokenizer), prefilled one prompt at a time; the prefix cache is off so that every pass computes every position.

    python benchmarks/kv_cache_accuracy.py                         # the tiny DeepSeek-V3 on the CPU (attention=torch)
    python benchmarks/kv_cache_accuracy.py model=deepseek_v3 model.random_weights=true model.num_layers=4 \\
        weights=fp8 --prompts 8 --prompt-len 2048 --gen-len 256 --json kv_accuracy.json   # full width, a GPU

Other arguments of the form key=value are the runner's settings (``python -m mla_runner --help``).
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
from typing import Optional

import torch

LAYOUTS = ("auto", "fp8", "fp8_calibrated", "fp8_ds_mla")
LOGIT_ROWS = 64  # positions whose logits are compared at once (rows x vocab in float64)


class Taps:
    """Forward hooks on a model: each MLA layer's input and output and the final hidden states, appended step after
    step (on the host); with ``feed`` (a reference run's inputs, per layer in step order) each layer's input is
    replaced by the reference's."""

    def __init__(self, model, feed: Optional[list[list[torch.Tensor]]] = None):
        self.layers = model.attention_layers
        self.inputs: list[list[torch.Tensor]] = [[] for _ in self.layers]
        self.outputs: list[list[torch.Tensor]] = [[] for _ in self.layers]
        self.final: list[torch.Tensor] = []
        self.handles = [model.register_forward_hook(lambda m, a, out: self.final.append(out.cpu()))]
        for i, attn in enumerate(self.layers):
            self.handles.append(attn.register_forward_pre_hook(self._pre(i, feed)))
            self.handles.append(attn.register_forward_hook(lambda m, a, out, i=i: self.outputs[i].append(out.cpu())))

    def _pre(self, i: int, feed):
        def hook(module, args):
            if feed is None:
                self.inputs[i].append(args[0].cpu())
                return None
            x = feed[i][len(self.inputs[i])]
            self.inputs[i].append(x)
            return (x.to(args[0].device), *args[1:])
        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def build_engine(overrides: list[str], kind: str):
    from mla_runner.compose import compose_config
    from mla_runner.engine import LLMEngine

    layout = "fp8" if kind == "fp8_calibrated" else kind
    return LLMEngine(compose_config([*overrides, f"kv_cache_dtype={layout}"]))


def teacher_forced(engine, prompts: list[list[int]], feed=None) -> Taps:
    """Each prompt prefilled alone (max_tokens=1: no decode step), the hooks recording every position (eager: the
    piecewise graphs of steps with chunks call no module's forward)."""
    from mla_runner.sampling import SamplingParams

    taps = Taps(engine.runner.model, feed)
    try:
        params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
        with engine.runner.eager():
            for i, ids in enumerate(prompts):
                engine.run([engine.make_request(i, ids, params)], progress=False)
    finally:
        taps.close()
    return taps


def greedy(engine, prompts: list[list[int]], gen_len: int) -> list[list[int]]:
    from mla_runner.sampling import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=gen_len, ignore_eos=True)
    reqs = engine.run([engine.make_request(i, ids, params) for i, ids in enumerate(prompts)], progress=False)
    return [list(r.output_token_ids) for r in reqs]


def rel_errors(got: list[list[torch.Tensor]], ref: list[list[torch.Tensor]]) -> list[float]:
    """Per layer: ||got - ref|| / ||ref|| over all recorded rows (float64)."""
    out = []
    for g, r in zip(got, ref):
        g, r = torch.cat(g).double(), torch.cat(r).double()
        out.append(((g - r).norm() / r.norm().clamp_min(1e-300)).item())
    return out


def logit_metrics(engine, final: list[torch.Tensor], ref_final: list[torch.Tensor]) -> tuple[list[float], list[bool]]:
    """Per prompt position: KL(p_ref || p) and whether the argmaxes agree, the logits made by this engine's head from
    both runs' final hidden states."""
    h, h_ref = torch.cat(final), torch.cat(ref_final)
    kl, agree = [], []
    for lo in range(0, h.shape[0], LOGIT_ROWS):
        rows = [x[lo:lo + LOGIT_ROWS].to(engine.runner.device) for x in (h, h_ref)]
        logp, logp_ref = (engine.runner.model.compute_logits(x).double().log_softmax(-1) for x in rows)
        kl += (logp_ref.exp() * (logp_ref - logp)).sum(-1).tolist()
        agree += (logp.argmax(-1) == logp_ref.argmax(-1)).tolist()
    return kl, agree


def first_divergence(got: list[int], ref: list[int]) -> int:
    return next((i for i, (a, b) in enumerate(zip(got, ref)) if a != b), len(ref))


def measure(args, overrides: list[str]) -> dict:
    from mla_runner.kernels.fp8_block import FP8_MAX

    ref_engine = build_engine(overrides, "auto")
    r = ref_engine.runner.resolved
    gen = torch.Generator().manual_seed(args.seed)
    vocab = ref_engine.args.vocab_size
    prompts = [torch.randint(0, vocab, (args.prompt_len,), generator=gen).tolist() for _ in range(args.prompts)]
    ref = teacher_forced(ref_engine, prompts)
    ref_tokens = greedy(ref_engine, prompts, args.gen_len)
    # every latent the reference wrote, prompts and generations: each layer's largest magnitude
    amax = ref_engine.runner.kv.cache.flatten(1).abs().amax(1).float().cpu()
    result = {"model": ref_engine.cfg.model.name, "device": r["device"], "dtype": r["dtype"],
              "attention": r["attention"], "prompts": args.prompts, "prompt_len": args.prompt_len,
              "gen_len": args.gen_len, "latent_amax": amax.tolist(), "layouts": {}}
    del ref_engine
    for kind in args.layouts:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        engine = build_engine(overrides, kind)
        runner = engine.runner
        if kind == "fp8_calibrated":
            runner.kv.scales.copy_((amax / FP8_MAX).clamp_min(2.0**-126).to(runner.kv.scales.device))
        through = teacher_forced(engine, prompts)
        alone = teacher_forced(engine, prompts, feed=ref.inputs)
        kl, agree = logit_metrics(engine, through.final, ref.final)
        tokens = greedy(engine, prompts, args.gen_len)
        firsts = [first_divergence(t, rt) for t, rt in zip(tokens, ref_tokens)]
        same = sum(a == b for t, rt in zip(tokens, ref_tokens) for a, b in zip(t, rt))
        n = args.prompt_len
        result["layouts"][kind] = {
            "kv_cache_dtype": runner.kv.layout.kind, "bytes_per_token": runner.kv.layout.bytes_per_token,
            "scales": runner.kv.scales.tolist() if runner.kv.scales is not None else None,
            "layer_rel_err_alone": rel_errors(alone.outputs, ref.outputs),
            "layer_rel_err_through": rel_errors(through.outputs, ref.outputs),
            "kl_mean": sum(kl) / len(kl), "kl_max": max(kl),
            "kl_per_position": [sum(kl[p * n + j] for p in range(args.prompts)) / args.prompts for j in range(n)],
            "top1_agreement": sum(agree) / len(agree),
            "top1_per_position": [sum(agree[p * n + j] for p in range(args.prompts)) / args.prompts for j in range(n)],
            "greedy_agreement": same / sum(len(t) for t in ref_tokens),
            "first_divergence": firsts,
        }
        del engine, runner, through, alone
    return result


def print_table(result: dict) -> None:
    print(f"{result['model']} on {result['device']} ({result['dtype']}, attention={result['attention']}): "
          f"{result['prompts']} prompts of {result['prompt_len']} tokens, {result['gen_len']} generated; latent amax "
          f"per layer {', '.join(f'{a:.3g}' for a in result['latent_amax'])}")
    print(f"{'layout':<15} {'B/token':>7} {'layer rel err, alone (max)':>27} {'through (last)':>15} {'KL mean':>9} "
          f"{'KL max':>9} {'top-1':>7} {'greedy':>7} {'1st diff (min, mean)':>21}")
    for kind, m in result["layouts"].items():
        firsts = m["first_divergence"]
        print(f"{kind:<15} {m['bytes_per_token']:>7} {max(m['layer_rel_err_alone']):>27.3e} "
              f"{m['layer_rel_err_through'][-1]:>15.3e} {m['kl_mean']:>9.2e} {m['kl_max']:>9.2e} "
              f"{m['top1_agreement']:>7.3f} {m['greedy_agreement']:>7.3f} "
              f"{min(firsts):>10} {sum(firsts) / len(firsts):>10.1f}")


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="the runner's settings, key=value (model=..., device=...)")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--gen-len", type=int, default=128)
    parser.add_argument("--layouts", default=",".join(LAYOUTS), help=f"a comma list of {', '.join(LAYOUTS)}")
    parser.add_argument("--seed", type=int, default=0, help="of the prompts")
    parser.add_argument("--json", help="write every number here")
    args = parser.parse_args(argv)
    args.layouts = [k for k in args.layouts.split(",") if k]
    for name in ("prompts", "prompt_len", "gen_len"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if not args.layouts or any(k not in LAYOUTS for k in args.layouts):
        parser.error(f"--layouts takes a comma list of {', '.join(LAYOUTS)}")
    settings = {"enable_prefix_caching": "false", "progress": "false", "max_batch_size": str(args.prompts),
                "max_model_len": str(args.prompt_len + args.gen_len)}
    for item in args.overrides:
        key, eq, value = item.partition("=")
        if not eq:
            parser.error(f"{item!r}: the runner's settings are key=value")
        if key.lstrip("+") == "kv_cache_dtype":
            parser.error("kv_cache_dtype is what the harness varies: pick layouts with --layouts")
        settings[key] = value
    result = measure(args, [f"{k}={v}" for k, v in settings.items()])
    print_table(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
