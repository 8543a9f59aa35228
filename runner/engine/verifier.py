"""The sampling side of a speculative step (docs/speculative.md, section 4): from the target's logits at every
position of the requests that verify drafts to the tokens each request emits.

A request that drafted d tokens fed the model its last token and its drafts, so the step gives it d + 1 logits
rows: row j is the target's distribution of the token after draft j - 1 (row 0: after its last token). Each row is
processed as the sampler processes a next token (``sample_with_probs``: penalties and ``min_tokens`` over the output
as it would be with the drafts before that row accepted, then temperature, min_p, top-k, top-p), and
``rejection.verify`` keeps the longest acceptable prefix of the drafts plus one token of the target's. Requests of
the step that drafted nothing (plain decodes, prompts that end) take one row and are sampled by ``sample``, as in a
step without drafts. Everything stays on the device until the one copy of the emitted tokens to the host.

A step whose requests all want the argmax and nothing else (greedy, no logprobs, no penalties, past ``min_tokens``:
the usual case, and every benchmark's) is verified on the host instead: one argmax over the rows, one copy of it, and
the longest matching prefix of each request's drafts found in Python, where the general path launches some forty
small kernels (docs/speculative.md, section 7, has the times).
"""
from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Optional

import torch

from mla_runner.config import SpeculativeConfig
from mla_runner.engine.rejection import PAD, AcceptanceStats, VerifyOutput, forced_num_accepted, verify
from mla_runner.engine.request import Request
from mla_runner.engine.sampler import DrawKeys, TokenLogprobs, sample, sample_with_probs, top_logprobs


class Verifier:
    """Per engine: the verification settings, the acceptance statistics and the forced-acceptance generator."""

    def __init__(self, spec: SpeculativeConfig, device: torch.device, seed: int = 0):
        self.max_drafts = spec.num_tokens
        self.force_acceptance_length = spec.force_acceptance_length
        self.stats = AcceptanceStats(spec.num_tokens, device)
        # forced acceptance draws from its own generator, so that a benchmark's accepted counts repeat run to run
        self.forced_generator = torch.Generator(device=device)
        self.forced_generator.manual_seed(seed)

    def emit(self, logits: torch.Tensor, reqs: Sequence[Request], num_drafts: Sequence[int],
             seeds: Sequence[int], eos_token_ids: Sequence[int],
             ) -> tuple[list[list[int]], list[list[TokenLogprobs]]]:
        """The tokens each request emits, in order (1 to d_b + 1), and their logprobs where it asks for them.

        ``logits`` [sum(d_b + 1), V] fp32: request b's d_b + 1 rows in turn, its drafts ``reqs[b].draft_token_ids
        [:d_b]``; ``seeds``: request b's sampling seed. A request without drafts is sampled by ``sample`` itself, as in
        a step without drafts."""
        if all(_argmax_only(req) for req in reqs):
            return self._emit_argmax(logits, reqs, num_drafts), [[] for _ in reqs]
        device, B = logits.device, len(reqs)
        starts = list(itertools.accumulate((d + 1 for d in num_drafts), initial=0))
        plain = [b for b, d in enumerate(num_drafts) if d == 0]
        drafted = [b for b, d in enumerate(num_drafts) if d]
        tokens = torch.full((B, self.max_drafts + 1), PAD, dtype=torch.long, device=device)
        counts = torch.ones(B, dtype=torch.long, device=device)
        plain_logprobs = drafted_logprobs = None
        if plain:
            index = torch.tensor(plain, device=device)
            rows = torch.tensor([starts[b] for b in plain], device=device)
            out = sample(logits[rows], [reqs[b].params for b in plain],
                         DrawKeys([seeds[b] for b in plain], [len(reqs[b].output_token_ids) for b in plain]),
                         [reqs[b].prompt_token_ids for b in plain], [reqs[b].output_token_ids for b in plain],
                         eos_token_ids)
            tokens[index, 0] = out.tokens
            plain_logprobs = out.logprobs
        if drafted:
            index = torch.tensor(drafted, device=device)
            rows = torch.tensor([starts[b] + j for b in drafted for j in range(num_drafts[b] + 1)], device=device)
            sub = [reqs[b] for b in drafted]
            out = self._verify(logits[rows], sub, [num_drafts[b] for b in drafted], [seeds[b] for b in drafted],
                               eos_token_ids)
            tokens[index], counts[index] = out.tokens, out.num_tokens
            drafted_logprobs = self._logprobs(logits[rows], sub, [num_drafts[b] for b in drafted], out.tokens)
        host_tokens, host_counts = tokens.tolist(), counts.tolist()
        emitted = [row[:n] for row, n in zip(host_tokens, host_counts)]
        entries: list[list[TokenLogprobs]] = [[] for _ in reqs]
        if plain_logprobs is not None:
            for b, entry in zip(plain, plain_logprobs.to_host([reqs[b].params.logprobs for b in plain])):
                entries[b] = [] if entry is None else [entry]
        if drafted_logprobs is not None:
            for b, host in zip(drafted, drafted_logprobs):
                entries[b] = host[: host_counts[b]] if reqs[b].params.logprobs is not None else []
        return emitted, entries

    def _emit_argmax(self, logits: torch.Tensor, reqs: Sequence[Request], num_drafts: Sequence[int]
                     ) -> list[list[int]]:
        """``emit`` for requests that all take the argmax: each keeps its drafts as far as they equal the target's
        argmax at their rows (or as many as forced acceptance says), then the target's argmax at the next row."""
        target = logits.argmax(dim=-1)
        T = target.shape[0]
        drafted = [d for d in num_drafts if d]
        if self.force_acceptance_length is not None and drafted:  # the draws of the device path: requests that drafted
            counts = torch.tensor(drafted, dtype=torch.long).to(logits.device, non_blocking=True)
            target = torch.cat([target, forced_num_accepted(self.force_acceptance_length, counts,
                                                            self.forced_generator)])
        host = target.tolist()
        forced = iter(host[T:]) if len(host) > T else None
        accepted_counts, emitted, row = [], [], 0
        for req, d in zip(reqs, num_drafts):
            drafts, rows = req.draft_token_ids[:d], host[row : row + d + 1]
            row += d + 1
            if forced is not None and d:
                accepted = next(forced)
            else:
                accepted = 0
                while accepted < d and drafts[accepted] == rows[accepted]:
                    accepted += 1
            accepted_counts.append(accepted)
            emitted.append(drafts[:accepted] + [rows[accepted]])
        self.stats.add_host(num_drafts, accepted_counts)
        return emitted

    def _verify(self, logits: torch.Tensor, reqs: Sequence[Request], num_drafts: Sequence[int],
                seeds: Sequence[int], eos_token_ids: Sequence[int]) -> VerifyOutput:
        """``rejection.verify`` of requests that drafted, from their d + 1 rows each; the statistics counted."""
        drafts = [req.draft_token_ids[:d] for req, d in zip(reqs, num_drafts)]
        row_params, row_seeds, row_positions, row_prompts, row_outputs = [], [], [], [], []
        for req, x, seed in zip(reqs, drafts, seeds):
            out, p = req.output_token_ids, req.params
            # the output as row j sees it, where the sampler reads more than its length: penalties, min_tokens
            exact = p.penalized or len(out) < p.min_tokens
            for j in range(len(x) + 1):
                row_params.append(p)
                row_seeds.append(seed)
                row_positions.append(len(out) + j)
                row_prompts.append(req.prompt_token_ids)
                row_outputs.append(out + x[:j] if j and exact else out)
        target = sample_with_probs(logits, row_params, DrawKeys(row_seeds, row_positions), row_prompts, row_outputs,
                                   eos_token_ids)
        device = logits.device
        counts = torch.tensor(list(num_drafts), dtype=torch.long, device=device)
        flat = torch.tensor([t for x in drafts for t in x], dtype=torch.long, device=device)
        forced = None
        if self.force_acceptance_length is not None:
            forced = forced_num_accepted(self.force_acceptance_length, counts, self.forced_generator)
        is_greedy = None
        if target.probs is not None:
            is_greedy = torch.tensor([req.params.greedy for req in reqs], device=device)
        out = verify(flat, counts, target.tokens, self.max_drafts, target_probs=target.probs,
                     is_greedy=is_greedy, keys=DrawKeys(seeds, [len(req.output_token_ids) for req in reqs]),
                     forced_accepted=forced)
        self.stats.add(counts, out.num_accepted)
        return out

    @staticmethod
    def _logprobs(logits: torch.Tensor, reqs: Sequence[Request], num_drafts: Sequence[int], tokens: torch.Tensor,
                  ) -> Optional[list[list[Optional[TokenLogprobs]]]]:
        """Per request, the logprobs of each of its emitted tokens (``tokens`` [B, k + 1], PAD after them) from the
        raw logits of the row that emitted it (token i of request b: its row i), None where it does not ask; entries
        past a request's emitted tokens are made too, and cut by the caller. None when no request asks."""
        ks = [req.params.logprobs for req in reqs]
        if all(k is None for k in ks):
            return None
        B, width = tokens.shape
        device = logits.device
        counts = torch.tensor(list(num_drafts), device=device)
        starts = torch.cumsum(counts, 0) - counts + torch.arange(B, device=device)  # request b's rows: D_b + b on
        rows = torch.minimum(starts[:, None] + torch.arange(width, device=device)[None, :], (starts + counts)[:, None])
        logprobs = torch.log_softmax(logits[rows.flatten()], dim=-1)
        host = top_logprobs(logprobs, tokens.flatten().clamp(min=0), max(k for k in ks if k is not None)).to_host(
            [k for k in ks for _ in range(width)])
        return [host[b * width : (b + 1) * width] for b in range(B)]


def _argmax_only(req: Request) -> bool:
    """Whether the request's next tokens are the argmax of the raw logits and it asks for nothing else."""
    p = req.params
    return p.greedy and p.logprobs is None and not p.penalized and len(req.output_token_ids) >= p.min_tokens
