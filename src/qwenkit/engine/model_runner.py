"""Turns a scheduled step into tensors, runs the model once, and samples.

Per step: input_ids / positions / slot_mapping for the new tokens, the block tables of the
scheduled sequences, and the attention metadata, all built once as tensors. Logits are computed
only at the last token of sequences whose prompt is fully computed (the ones that sample), plus,
for a sequence that wants prompt log-probs, at each of its prompt positions in this step's chunk.

Logits processors (`logits_processors.py`): grammar masks are applied to the sampling rows, then
the sampler runs the others (one (B, V) additive tensor) after taking the raw log-probs.
"""
from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass, field
from typing import Mapping

import torch
from torch import nn

from qwenkit.engine.kv_cache import KVCache
from qwenkit.engine.logits_processors import apply_grammar, apply_logits_processors
from qwenkit.engine.paged_attention import PagedAttentionMetadata, SequenceGroup
from qwenkit.engine.sampler import Sampler, SamplerOutput
from qwenkit.engine.scheduler import SchedulerOutput
from qwenkit.engine.sequence import Sequence

PROMPT_LOGPROBS_ROWS = 128  # prompt positions per logits slice (bounds the (rows, V) buffers)


@dataclass
class PromptChunk:
    """Prompt positions of one sequence computed this step: flat rows [lo, hi) of the step's
    tokens predict `target_ids` (the prompt tokens at positions `first + 1 ...`)."""

    seq: Sequence
    lo: int
    hi: int
    target_ids: list[int]


@dataclass
class PromptLogprobs:
    """Raw log-probs of `token_ids` (prompt tokens, in order, appended to `seq.prompt_logprobs`)
    and the top-k alternatives at each of those positions."""

    seq: Sequence
    token_ids: list[int]
    logprobs: torch.Tensor  # (m,)
    top_token_ids: torch.Tensor | None = None  # (m, k)
    top_logprobs: torch.Tensor | None = None  # (m, k)


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # (N,)
    positions: torch.Tensor  # (N,)
    attn_metadata: PagedAttentionMetadata
    sample_index: torch.Tensor  # (S_sample,) flat index of the last token of each sampling seq
    sample_seqs: list[Sequence]
    prompt_chunks: list[PromptChunk] = field(default_factory=list)
    rope_factor_index: torch.Tensor | None = None  # (N,) per-request YaRN table of each token
    # vision-language steps with an image request: M-RoPE positions (3, N) and the image tokens'
    # (flat indices (K,), features (K, hidden))
    mrope_positions: torch.Tensor | None = None
    image_embeds: tuple[torch.Tensor, torch.Tensor] | None = None


@dataclass
class StepOutput:
    sample_seqs: list[Sequence]
    samples: SamplerOutput | None
    prompt_logprobs: list[PromptLogprobs] = field(default_factory=list)
    scored: dict[Sequence, torch.Tensor] = field(default_factory=dict)  # see `ModelRunner.run`


class ModelRunner:
    def __init__(
        self,
        model: nn.Module,
        kv_cache: KVCache,
        *,
        streaming_window: int | None = None,
        num_sink_tokens: int = 0,
    ) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = kv_cache.block_size
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.streaming_window = streaming_window
        self.num_sink_tokens = num_sink_tokens if streaming_window is not None else 0
        self.sampler = Sampler()
        rotary = getattr(getattr(model, "model", None), "rotary_emb", None)
        self.rope_per_request = bool(getattr(rotary, "factors", ()))
        self.num_image_encodings = 0  # vision encoder runs (one per image per request)

    def prepare(self, out: SchedulerOutput) -> StepInputs:
        seqs, num_new = out.seqs, out.num_new_tokens
        input_ids: list[int] = []
        starts: list[int] = []
        sample_index: list[int] = []
        sample_seqs: list[Sequence] = []
        prompt_chunks: list[PromptChunk] = []
        flat = 0
        for seq, n in zip(seqs, num_new):
            c = seq.num_cached_tokens
            input_ids.extend(seq.token_ids[c : c + n])
            starts.append(c)
            if seq.prompt_logprobs is not None:
                # Position p predicts token p + 1; positions already recorded are skipped.
                lo, hi = max(c, len(seq.prompt_logprobs) - 1), min(c + n, seq.num_prompt_tokens - 1)
                if hi > lo:
                    prompt_chunks.append(PromptChunk(seq, flat + lo - c, flat + hi - c, seq.token_ids[lo + 1 : hi + 1]))
            flat += n
            if c + n == len(seq):
                sample_index.append(flat - 1)
                sample_seqs.append(seq)
        width = max(len(s.block_table) for s in seqs)
        tables = [s.block_table + [-1] * (width - len(s.block_table)) for s in seqs]

        dev = self.device
        query_lens = torch.tensor(num_new, dtype=torch.long)  # (S,)
        start = torch.tensor(starts, dtype=torch.long)  # (S,)
        block_tables = torch.tensor(tables, dtype=torch.long)  # (S, max_blocks)
        seq_of_token = torch.repeat_interleave(torch.arange(len(seqs)), query_lens)  # (N,)
        cu = torch.cumsum(query_lens, 0) - query_lens  # (S,)
        positions = start[seq_of_token] + torch.arange(flat) - cu[seq_of_token]  # (N,)
        block = block_tables[seq_of_token, positions // self.block_size]  # (N,)
        assert bool((block >= 0).all()), "a token is scheduled into a missing block"
        slot_mapping = block * self.block_size + positions % self.block_size  # (N,)

        context_lens = start + query_lens
        num_decode = sum(1 for n in num_new if n == 1)
        assert all(n == 1 for n in num_new[:num_decode]), "decodes must come first"
        groups = [
            SequenceGroup(
                token_start=int(sum(num_new[:lo])),
                query_lens=query_lens[lo:hi],
                context_lens=context_lens[lo:hi],
                block_tables=block_tables[lo:hi],
                block_size=self.block_size,
                num_sink_tokens=self.num_sink_tokens,
                device=dev,
                dtype=self.dtype,
            )
            for lo, hi in ((0, num_decode), (num_decode, len(seqs)))
            if hi > lo
        ]
        metadata = PagedAttentionMetadata(
            self.kv_cache,
            slot_mapping.to(dev),
            groups,
            streaming_window=self.streaming_window,
        )
        mrope, image_embeds = self._multimodal(seqs, num_new, positions) if any(s.mm is not None for s in seqs) else (None, None)
        factor_index = None
        if self.rope_per_request:
            factor_index = torch.tensor([s.rope_factor_index for s in seqs])[seq_of_token].to(dev)
        return StepInputs(
            rope_factor_index=factor_index,
            input_ids=torch.tensor(input_ids, dtype=torch.long, device=dev),
            positions=positions.to(dev),
            attn_metadata=metadata,
            sample_index=torch.tensor(sample_index, dtype=torch.long, device=dev),
            sample_seqs=sample_seqs,
            prompt_chunks=prompt_chunks,
            mrope_positions=mrope.to(dev) if mrope is not None else None,
            image_embeds=image_embeds,
        )

    def _multimodal(
        self, seqs: list[Sequence], num_new: list[int], positions: torch.Tensor
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """M-RoPE positions (3, N) of the step and the vision features of the image tokens in it
        (a chunk may hold part of an image: its rows of the features)."""
        mrope = positions.expand(3, -1).clone()
        index, feats = [], []
        flat = 0
        for seq, n in zip(seqs, num_new):
            mm, c = seq.mm, seq.num_cached_tokens
            if mm is not None:
                mrope[:, flat : flat + n] = mm.rope_positions(c, n)
                for j, (s, e) in enumerate(mm.ranges):
                    lo, hi = max(s, c), min(e, c + n)
                    if lo < hi:
                        index.append(torch.arange(flat + lo - c, flat + hi - c))
                        feats.append(self._image_features(mm, j)[lo - s : hi - s])
            flat += n
        if not index:
            return mrope, None
        return mrope, (torch.cat(index).to(self.device), torch.cat(feats))

    def _image_features(self, mm, j: int) -> torch.Tensor:  # type: ignore[no-untyped-def]
        if mm.features[j] is None:  # once per image: kept on the request across preemptions
            mm.features[j] = self.model.encode_images(mm.pixel_values[j].to(self.device), [mm.grids[j]])[0]
            self.num_image_encodings += 1
        return mm.features[j]

    @torch.inference_mode()
    def run(self, out: SchedulerOutput, score: Mapping[Sequence, int] | None = None) -> StepOutput:
        """One forward over the scheduled tokens; returns the samples and prompt log-probs.

        `score` (speculative decoding): sequences whose last `score[seq]` positions get their
        raw logits returned in `StepOutput.scored` instead of being sampled."""
        inputs = self.prepare(out)
        hidden = self.hidden_states(inputs)
        prompt_logprobs = [self._prompt_logprobs(hidden, chunk) for chunk in inputs.prompt_chunks]
        scored: dict[Sequence, torch.Tensor] = {}
        if score:
            for seq, end in zip(out.seqs, itertools.accumulate(out.num_new_tokens)):
                if seq in score:
                    scored[seq] = self.model.compute_logits(hidden[end - score[seq] : end])  # (m, V)
            keep = [i for i, s in enumerate(inputs.sample_seqs) if s not in scored]
            inputs.sample_seqs = [inputs.sample_seqs[i] for i in keep]
            inputs.sample_index = inputs.sample_index[keep]
        if not inputs.sample_seqs:
            return StepOutput([], None, prompt_logprobs, scored)
        logits = self.model.compute_logits(hidden[inputs.sample_index])  # (S_sample, V)
        return StepOutput(inputs.sample_seqs, self.sample(logits, inputs.sample_seqs), prompt_logprobs, scored)

    def hidden_states(self, inputs: StepInputs) -> torch.Tensor:
        """The step's final-normed hidden states (N, hidden)."""
        if inputs.mrope_positions is not None:
            return self.model.hidden_states(
                inputs.input_ids, None, inputs.attn_metadata,
                mrope_positions=inputs.mrope_positions, image_embeds=inputs.image_embeds,
            )  # fmt: skip
        if inputs.rope_factor_index is None:
            return self.model.hidden_states(inputs.input_ids, inputs.positions, inputs.attn_metadata)
        return self.model.hidden_states(
            inputs.input_ids, inputs.positions, inputs.attn_metadata, rope_factor_index=inputs.rope_factor_index
        )

    def _prompt_logprobs(self, hidden: torch.Tensor, chunk: PromptChunk) -> PromptLogprobs:
        """Raw log-probs of the chunk's target tokens, in slices of PROMPT_LOGPROBS_ROWS rows."""
        k = chunk.seq.sampling_params.prompt_logprobs or 0
        targets = torch.tensor(chunk.target_ids, dtype=torch.long, device=hidden.device)
        lps, top_ids, top_lps = [], [], []
        for lo in range(chunk.lo, chunk.hi, PROMPT_LOGPROBS_ROWS):
            hi = min(lo + PROMPT_LOGPROBS_ROWS, chunk.hi)
            logprobs = self.model.compute_logits(hidden[lo:hi]).float().log_softmax(dim=-1)  # (m, V)
            rows = targets[lo - chunk.lo : hi - chunk.lo, None]
            lps.append(logprobs.gather(1, rows)[:, 0])
            if k:
                vals, idx = logprobs.topk(k, dim=-1)
                top_lps.append(vals)
                top_ids.append(idx)
        return PromptLogprobs(
            chunk.seq, chunk.target_ids, torch.cat(lps),
            torch.cat(top_ids) if k else None, torch.cat(top_lps) if k else None,
        )  # fmt: skip

    def sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> SamplerOutput:
        params = [s.sampling_params for s in seqs]
        penalised = any(
            p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1.0 for p in params
        )
        # Token histories are only materialised when some row applies a penalty.
        prompt_ids = [s.prompt_token_ids if penalised else [] for s in seqs]
        output_ids = [s.output_token_ids if penalised else [] for s in seqs]
        generators = [s.generator for s in seqs]
        states = [s.logits_state for s in seqs]
        process = None
        if any(st is not None for st in states):
            logits = apply_grammar(logits, states)
            num_output = [s.num_output_tokens for s in seqs]
            recent = [
                s.token_ids[len(s) - min(st.spec.history_len, s.num_output_tokens) :]
                if st is not None and st.spec.history_len else []
                for s, st in zip(seqs, states)
            ]  # fmt: skip
            process = functools.partial(apply_logits_processors, states=states, num_output=num_output, recent=recent)
        return self.sampler(logits, params, prompt_ids, output_ids, generators, process=process)
