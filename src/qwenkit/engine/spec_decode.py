"""Speculative decoding: a cheap proposer drafts up to k tokens per sequence, the target model
scores all k + 1 positions in one forward, and the longest acceptable prefix is kept.

Proposers (vLLM's `speculative_config`):
* ``{"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_max": 4, "prompt_lookup_min": 3}``
  prompt lookup: the longest suffix (of prompt_lookup_max down to prompt_lookup_min tokens) of
  prompt + output that occurred earlier; the tokens that followed its first occurrence are the
  draft (up to k; fewer when the match is near the end).
* ``{"model": "qwen2.5-coder-0.5b-instruct", "num_speculative_tokens": k}`` a draft model with the
  same vocabulary: its own paged KV cache and block manager, one `Sequence` mirror per target
  sequence, kept in sync with the accepted tokens (rejected positions are rolled back).

Engine flow per step (`LLMEngine.step` calls these hooks): `propose` appends the drafts to the
token ids of sequences in the decode state, so the scheduler sees a k + 1 token chunk and
allocates its blocks; `after_schedule` strips drafts from sequences that were not scheduled
whole; the model runner returns raw logits at the k + 1 positions (`score`); `verify` chooses
the accepted tokens, sets how many positions the step really computed (the KV of rejected ones
is discarded: their blocks are trimmed, their slots overwritten later) and hands the tokens to
the engine, which appends them one by one through its usual stop rules (EOS, stop strings,
max_tokens), so tokens past a stop are dropped.

Verification: each draft position's target distribution is built by the sampler itself
(`Sampler.distribution`: logits processors, penalties over the history including the earlier
drafts, temperature, top-k / top-p / min-p), so the accepted tokens follow the same law as
non-speculative decoding. Greedy rows accept while the argmax equals the draft. Sampled rows use
rejection sampling (Leviathan et al. 2023; Chen et al. 2023): accept draft x with probability
min(1, p(x) / q(x)); on rejection draw from norm(max(0, p - q)); when all are accepted draw a
bonus token from p at the last position. The n-gram proposal is deterministic (q one-hot), so it
is accepted with probability p(x). Log-probs are those of the target (raw, as the sampler's).

Not speculated (plain decode steps): sequences with a structured-output grammar (the matcher
cannot roll back), StreamingLLM mode, and the last token of a request.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import nn

from qwenkit import cpu
from qwenkit.engine.block_manager import BlockManager
from qwenkit.engine.kv_cache import KVCache
from qwenkit.engine.logits_processors import apply_logits_processors
from qwenkit.engine.model_runner import ModelRunner
from qwenkit.engine.sampler import Distribution, Sampler, SamplerOutput
from qwenkit.engine.scheduler import Scheduler, SchedulerOutput
from qwenkit.engine.sequence import Sequence, SequenceStatus

logger = logging.getLogger(__name__)

METHODS = ("ngram", "draft_model")


@dataclass(frozen=True)
class SpeculativeConfig:
    """vLLM's `speculative_config` keys. `model`: a registry name / path (loaded with
    `quantization`, default the target's usual ``auto``) or a built nn.Module (tests)."""

    num_speculative_tokens: int
    method: str = "ngram"
    model: Any = None
    prompt_lookup_max: int = 4
    # 3, not 1: one- and two-token matches are mostly chance on fresh code and each costs a
    # verification step (docs/benchmarks.md, Speculative decoding: n-gram on HumanEval 0.8-0.9x at 1)
    prompt_lookup_min: int = 3
    quantization: str = "auto"

    @classmethod
    def from_dict(cls, config: Mapping[str, Any] | SpeculativeConfig) -> SpeculativeConfig:
        if isinstance(config, SpeculativeConfig):
            return config
        if not isinstance(config, Mapping):
            raise TypeError(f"speculative_config must be a dict, got {type(config).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(config) - names)
        if unknown:
            raise ValueError(f"speculative_config: unknown key(s) {unknown}; valid: {sorted(names)}")
        kw = dict(config)
        if "num_speculative_tokens" not in kw:
            raise ValueError("speculative_config: num_speculative_tokens is required")
        if kw.get("method") is None:
            kw["method"] = "draft_model" if kw.get("model") is not None else "ngram"
        if kw.get("prompt_lookup_max") is not None and kw.get("prompt_lookup_min") is None:
            kw["prompt_lookup_min"] = min(cls.prompt_lookup_min, kw["prompt_lookup_max"])
        kw = {k: v for k, v in kw.items() if v is not None}
        return cls(**kw)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"speculative_config: method must be one of {list(METHODS)}, got {self.method!r}")
        if not isinstance(self.num_speculative_tokens, int) or self.num_speculative_tokens < 1:
            raise ValueError(
                f"speculative_config: num_speculative_tokens must be an int >= 1, got {self.num_speculative_tokens!r}"
            )
        if self.method == "draft_model" and self.model is None:
            raise ValueError("speculative_config: method 'draft_model' needs model (a name, path or nn.Module)")
        if self.method == "ngram":
            if self.model is not None:
                raise ValueError("speculative_config: method 'ngram' takes no model")
            if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max:
                raise ValueError(
                    "speculative_config: need 1 <= prompt_lookup_min <= prompt_lookup_max, got "
                    f"{self.prompt_lookup_min}, {self.prompt_lookup_max}"
                )


# ---------------------------------------------------------------------- proposers
def ngram_propose(tokens: np.ndarray, min_n: int, max_n: int, k: int) -> list[int]:
    """The tokens that followed the first earlier occurrence of the longest matching suffix
    (max_n down to min_n tokens) of `tokens`; [] when none matches."""
    length = len(tokens)
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        windows = np.lib.stride_tricks.sliding_window_view(tokens[: length - 1], n)  # starts 0..L-1-n
        hits = np.flatnonzero((windows == tokens[length - n :]).all(axis=1))
        if hits.size:
            start = int(hits[0]) + n
            return tokens[start : start + k].tolist()
    return []


@dataclass
class Draft:
    tokens: list[int]
    probs: torch.Tensor | None = None  # (m, V) proposal distribution q of sampled rows; None = one-hot


# (sequence, its token history before each row) -> the rows' distribution
DistributionFn = Callable[[list[tuple[Sequence, list[int]]], torch.Tensor], Distribution]


class NgramProposer:
    def __init__(self, config: SpeculativeConfig) -> None:
        self.min_n, self.max_n = config.prompt_lookup_min, config.prompt_lookup_max

    def propose(self, wanted: list[tuple[Sequence, int]], distribution: DistributionFn) -> dict[Sequence, Draft]:
        out = {}
        for seq, k in wanted:
            tokens = ngram_propose(np.asarray(seq.token_ids, dtype=np.int64), self.min_n, self.max_n, k)
            if tokens:
                out[seq] = Draft(tokens)
        return out

    def release_finished(self) -> None:
        pass

    def stats(self) -> dict[str, Any]:
        return {}


class DraftModelProposer:
    """A smaller model drafting k tokens with k forwards of its own (batched over sequences)."""

    def __init__(
        self,
        model: nn.Module,
        *,
        block_size: int,
        kv_cache_memory: int | str | None,
        max_useful_tokens: int,
        install_cpu_runtime: bool,
    ) -> None:
        param = next(model.parameters())
        if param.device.type == "cpu" and install_cpu_runtime:
            cpu.install(model)
        self.model = model
        self.kv_cache = KVCache.from_memory_budget(
            model.config, block_size, kv_cache_memory, param.dtype, param.device, max_useful_tokens=max_useful_tokens
        )
        self.block_manager = BlockManager(self.kv_cache.num_blocks, block_size, enable_prefix_caching=False)
        self.runner = ModelRunner(model, self.kv_cache)
        self.mirrors: dict[Sequence, Sequence] = {}  # target sequence -> the draft's copy
        self._synced: dict[Sequence, int] = {}  # tokens known equal to the target's

    def _mirror(self, seq: Sequence) -> Sequence:
        ds = self.mirrors.get(seq)
        if ds is None:
            ds = self.mirrors[seq] = Sequence(seq.token_ids, seq.sampling_params, request_id=seq.request_id)
            self._synced[seq] = len(seq)
            return ds
        # Everything before the last sync is equal; later, the accepted tokens may differ from
        # the drafts: the draft's KV is kept only up to the first difference.
        c = self._synced[seq]
        end = min(ds.num_cached_tokens, len(seq) - 1)
        while c < end and ds.token_ids[c] == seq.token_ids[c]:
            c += 1
        ds.num_cached_tokens = min(ds.num_cached_tokens, c, len(seq) - 1)
        ds.token_ids = list(seq.token_ids)
        self._synced[seq] = len(seq)
        self.block_manager.trim(ds, ds.num_cached_tokens)
        return ds

    def _drop(self, seq: Sequence) -> None:
        ds = self.mirrors.pop(seq)
        self._synced.pop(seq)
        self.block_manager.free(ds)

    def release_finished(self) -> None:
        for seq in [s for s in self.mirrors if s.is_finished]:
            self._drop(seq)

    @torch.inference_mode()
    def propose(self, wanted: list[tuple[Sequence, int]], distribution: DistributionFn) -> dict[Sequence, Draft]:
        self.release_finished()
        drafts: dict[Sequence, list[int]] = {seq: [] for seq, _ in wanted}
        probs: dict[Sequence, list[torch.Tensor | None]] = {seq: [] for seq, _ in wanted}
        active = [(seq, k, self._mirror(seq)) for seq, k in wanted]
        for r in range(max((k for _, k in wanted), default=0)):
            batch: list[tuple[Sequence, Sequence, int]] = []
            for seq, k, ds in active:
                if k <= r:
                    continue
                n = ds.num_uncomputed_tokens
                if not self.block_manager.allocate(ds, n):
                    continue  # no room in the draft's cache: this sequence stops drafting
                batch.append((seq, ds, n))
            if not batch:
                break
            batch.sort(key=lambda item: item[2] > 1)  # decodes first (the runner groups them)
            sched = SchedulerOutput([ds for _, ds, _ in batch], [n for _, _, n in batch])
            result = self.runner.run(sched, score={ds: 1 for _, ds, _ in batch})
            for _, ds, n in batch:
                ds.num_cached_tokens += n
            logits = torch.cat([result.scored[ds] for _, ds, _ in batch])  # (B, V)
            dist = distribution([(seq, seq.token_ids + drafts[seq]) for seq, _, _ in batch], logits)
            for i, (seq, ds, _) in enumerate(batch):
                if dist.probs is None or bool(dist.greedy[i]):
                    token, q = int(dist.greedy_ids[i]), None
                else:
                    q = dist.probs[i]
                    token = int(torch.multinomial(q, 1, generator=seq.generator))
                drafts[seq].append(token)
                probs[seq].append(q)
                ds.token_ids.append(token)
            active = [(seq, k, ds) for seq, k, ds in active if drafts[seq] and len(drafts[seq]) == r + 1]
        out = {}
        for seq, tokens in drafts.items():
            if tokens:
                qs = probs[seq]
                out[seq] = Draft(tokens, torch.stack(qs) if all(q is not None for q in qs) else None)
        return out

    def stats(self) -> dict[str, Any]:
        return {"spec_decode_draft_num_free_blocks": self.block_manager.num_free_blocks,
                "spec_decode_draft_num_blocks": self.block_manager.num_blocks}  # fmt: skip


def load_draft_model(config: SpeculativeConfig, target: nn.Module, tokenizer: Any) -> nn.Module:
    """The draft as an nn.Module, loaded on the target's device and dtype; ValueError when its
    vocabulary differs from the target's."""
    model = config.model
    if not isinstance(model, nn.Module):
        from qwenkit.loaders.load import load

        param = next(target.parameters())
        loaded = load(model, dtype=param.dtype, device=param.device, quantization=config.quantization)
        model = loaded.model
        draft_tok = loaded.tokenizer
        if tokenizer is not None and draft_tok is not None and draft_tok.get_vocab() != tokenizer.get_vocab():
            raise ValueError(
                f"speculative_config: the draft model {config.model!r} has a different tokenizer "
                "vocabulary than the target model (the same tokenizer is required)"
            )
    tv, dv = target.config.vocab_size, model.config.vocab_size
    if tv != dv:
        raise ValueError(
            f"speculative_config: the draft model's vocab_size {dv} differs from the target's {tv} "
            "(the same tokenizer is required)"
        )
    return model


# ---------------------------------------------------------------------- the engine's driver
@dataclass
class SpecResult:
    """Tokens to append to `seq` (whose token ids are cut back to `base_len` first)."""

    seq: Sequence
    base_len: int
    tokens: list[int]
    samples: SamplerOutput  # one row per token (log-probs of the target)


class SpecDecoder:
    def __init__(
        self,
        config: SpeculativeConfig,
        *,
        model: nn.Module,
        tokenizer: Any,
        sampler: Sampler,
        block_manager: BlockManager,
        block_size: int,
        kv_cache_memory: int | str | None,
        max_useful_tokens: int,
        install_cpu_runtime: bool,
    ) -> None:
        self.config = config
        self.k = config.num_speculative_tokens
        self.sampler = sampler
        self.block_manager = block_manager
        self.proposer: NgramProposer | DraftModelProposer
        if config.method == "ngram":
            self.proposer = NgramProposer(config)
        else:
            draft = load_draft_model(config, model, tokenizer)
            self.proposer = DraftModelProposer(
                draft, block_size=block_size, kv_cache_memory=kv_cache_memory,
                max_useful_tokens=max_useful_tokens, install_cpu_runtime=install_cpu_runtime,
            )  # fmt: skip
        self._drafts: dict[Sequence, Draft] = {}
        self.num_drafts = 0  # verifications (a sequence with >= 1 draft token in a step)
        self.num_draft_tokens = 0
        self.num_accepted_tokens = 0

    # -------------------------------------------------------------- distributions
    def distribution(self, rows: list[tuple[Sequence, list[int]]], logits: torch.Tensor) -> Distribution:
        """The sampler's distribution of each row: `rows[i]` = (sequence, its tokens before the
        position), so penalties and processors see the earlier drafts as generated tokens."""
        params = [seq.sampling_params for seq, _ in rows]
        penalised = any(p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1.0 for p in params)
        prompt_ids = [hist[: seq.num_prompt_tokens] if penalised else [] for seq, hist in rows]
        output_ids = [hist[seq.num_prompt_tokens :] if penalised else [] for seq, hist in rows]
        states = [seq.logits_state for seq, _ in rows]
        process = None
        if any(st is not None for st in states):
            num_output = [len(hist) - seq.num_prompt_tokens for seq, hist in rows]
            recent = [
                hist[len(hist) - min(st.spec.history_len, n) :] if st is not None and st.spec.history_len else []
                for (_, hist), st, n in zip(rows, states, num_output)
            ]  # fmt: skip
            process = functools.partial(apply_logits_processors, states=states, num_output=num_output, recent=recent)
        return self.sampler.distribution(logits, params, prompt_ids, output_ids, process=process)

    # -------------------------------------------------------------- engine hooks
    def propose(self, running: list[Sequence], max_model_len: int) -> None:
        """Append drafts to the running sequences that are about to decode."""
        wanted = []
        for seq in running:
            if seq.num_uncomputed_tokens != 1 or seq.num_output_tokens == 0:
                continue
            if seq.logits_state is not None and seq.logits_state.matcher is not None:
                continue
            p = seq.sampling_params
            remaining = (p.max_tokens if p.max_tokens is not None else max_model_len) - seq.num_output_tokens
            k = min(self.k, remaining - 1, max_model_len - len(seq) - 1)
            if k > 0:
                wanted.append((seq, k))
        if not wanted:
            return
        # Speculate only where the drafts' blocks are free: they must never preempt anyone.
        free = self.block_manager.num_free_blocks
        fits = []
        for seq, k in wanted:
            need = self.block_manager.num_blocks_needed(seq, k + 1)
            if need <= free:
                free -= need
                fits.append((seq, k))
        for seq, draft in self.proposer.propose(fits, self.distribution).items():
            seq.token_ids.extend(draft.tokens)
            self._drafts[seq] = draft

    def after_schedule(self, sched: SchedulerOutput, scheduler: Scheduler) -> dict[Sequence, int]:
        """Strip the drafts of sequences not scheduled whole; returns {seq: positions to score}."""
        if not self._drafts:
            return {}
        planned = dict(zip(sched.seqs, sched.num_new_tokens))
        for seq, draft in list(self._drafts.items()):
            m = len(draft.tokens)
            if planned.get(seq) == m + 1 and seq.status is SequenceStatus.RUNNING:
                continue
            del seq.token_ids[-m:]
            del self._drafts[seq]
            if seq in planned and seq.num_cached_tokens >= len(seq):
                # Preempted and readmitted in the same step with a prefix-cache hit reaching
                # into its drafts: recompute it from scratch next step.
                del planned[seq]
                scheduler.running.remove(seq)
                self.block_manager.free(seq)
                seq.reset_for_recompute()
                scheduler.add(seq)
            elif seq in planned:
                planned[seq] = min(planned[seq], seq.num_uncomputed_tokens)
        order = sorted(planned.items(), key=lambda item: item[1] > 1)  # decodes first
        sched.seqs[:] = [s for s, _ in order]
        sched.num_new_tokens[:] = [n for _, n in order]
        return {seq: len(d.tokens) + 1 for seq, d in self._drafts.items()}

    def verify(self, sched: SchedulerOutput, scored: Mapping[Sequence, torch.Tensor]) -> list[SpecResult]:
        """Accept / reject the drafts; fix the step's computed counts before `Scheduler.advance`."""
        if not self._drafts:
            return []
        drafts, self._drafts = self._drafts, {}
        rows: list[tuple[Sequence, list[int]]] = []
        for seq, d in drafts.items():
            base = len(seq) - len(d.tokens)
            rows += [(seq, seq.token_ids[: base + j]) for j in range(len(d.tokens) + 1)]
        logits = torch.cat([scored[seq] for seq in drafts])  # (R, V)
        dist = self.distribution(rows, logits)
        index = {seq: i for i, seq in enumerate(sched.seqs)}
        results = []
        r = 0
        for seq, d in drafts.items():
            m = len(d.tokens)
            tokens = self._accept(seq, d, dist, r)
            a = len(tokens) - 1
            self.num_drafts += 1
            self.num_draft_tokens += m
            self.num_accepted_tokens += a
            base = len(seq) - m
            # The step computed the KV of the last real token and of the accepted drafts only.
            sched.num_new_tokens[index[seq]] = a + 1
            del seq.token_ids[base + a :]
            self.block_manager.trim(seq, base + a)
            rows_used = torch.arange(r, r + a + 1, device=logits.device)
            out = Distribution(dist.greedy_ids[rows_used], dist.greedy[rows_used], None,
                               dist.raw_logprobs[rows_used] if dist.raw_logprobs is not None else None)  # fmt: skip
            results.append(SpecResult(seq, base, tokens, out.output(torch.tensor(tokens), [seq.sampling_params])))
            r += m + 1
        return results

    @staticmethod
    def _accept(seq: Sequence, d: Draft, dist: Distribution, r: int) -> list[int]:
        """Accepted drafts plus one token (the correction or the bonus); rows r .. r + m."""
        m = len(d.tokens)
        if dist.probs is None or bool(dist.greedy[r]):
            out = []
            for j, x in enumerate(d.tokens):
                t = int(dist.greedy_ids[r + j])
                out.append(t)
                if t != x:
                    return out
            return out + [int(dist.greedy_ids[r + m])]
        p = dist.probs[r : r + m + 1]  # (m + 1, V)
        x = torch.tensor(d.tokens)
        px = p[torch.arange(m), x]  # (m,)
        qx = d.probs[torch.arange(m), x] if d.probs is not None else torch.ones(m)
        u = torch.rand(m, generator=seq.generator, dtype=p.dtype)
        ok = (u * qx < px).tolist()  # u < p / q
        out = []
        for j in range(m):
            if not ok[j]:
                resid = p[j].clone()
                if d.probs is not None:
                    resid = (resid - d.probs[j]).clamp_(min=0)
                else:
                    resid[x[j]] = 0
                if float(resid.sum()) <= 0:  # p == q (up to rounding): p itself
                    resid = p[j]
                return out + [int(torch.multinomial(resid, 1, generator=seq.generator))]
            out.append(d.tokens[j])
        return out + [int(torch.multinomial(p[m], 1, generator=seq.generator))]

    def release_finished(self) -> None:
        self.proposer.release_finished()

    def stats(self) -> dict[str, Any]:
        return {
            "spec_decode_num_drafts": self.num_drafts,
            "spec_decode_num_draft_tokens": self.num_draft_tokens,
            "spec_decode_num_accepted_tokens": self.num_accepted_tokens,
            "spec_decode_acceptance_rate": self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0,
            # vLLM's "mean acceptance length": tokens a verification yields (the bonus included)
            "spec_decode_mean_acceptance_length": 1 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0,
            **self.proposer.stats(),
        }


# ---------------------------------------------------------------------- command-line flags
def add_speculative_args(parser: Any) -> None:
    """`--speculative-model`, `--speculative-method`, `--num-speculative-tokens` (vLLM's flags)."""
    g = parser.add_argument_group("speculative decoding")
    g.add_argument("--speculative-model", default=None, help="draft model (same tokenizer), e.g. qwen2.5-coder-0.5b-instruct")
    g.add_argument("--speculative-method", default=None, choices=list(METHODS),
                   help="ngram: prompt lookup (no draft model); draft_model (implied by --speculative-model)")  # fmt: skip
    g.add_argument("--num-speculative-tokens", type=int, default=None, help="draft tokens per step (default 4)")
    g.add_argument("--prompt-lookup-max", type=int, default=None, help="ngram: longest suffix matched (default 4)")
    g.add_argument("--prompt-lookup-min", type=int, default=None, help="ngram: shortest suffix matched (default 3, at most --prompt-lookup-max)")


def speculative_config_from_args(args: Any) -> dict[str, Any] | None:
    """The `speculative_config` dict the flags describe; None when speculation is off."""
    model, method = getattr(args, "speculative_model", None), getattr(args, "speculative_method", None)
    if model is None and method is None:
        if getattr(args, "num_speculative_tokens", None) is not None:
            raise ValueError("--num-speculative-tokens needs --speculative-model or --speculative-method ngram")
        return None
    out: dict[str, Any] = {"method": method, "model": model, "num_speculative_tokens": args.num_speculative_tokens or 4}
    if method == "ngram" or model is None:
        out["prompt_lookup_max"] = args.prompt_lookup_max
        out["prompt_lookup_min"] = args.prompt_lookup_min
    if model is not None and getattr(args, "quantization", None):
        out["quantization"] = args.quantization
    SpeculativeConfig.from_dict(out)  # bad flags fail here, before any model loads
    return {k: v for k, v in out.items() if v is not None}
