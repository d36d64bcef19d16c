"""Turns a scheduled step into tensors, runs the model once, and samples.

Per step: input_ids / positions / slot_mapping for the new tokens, the block tables of the
scheduled sequences, and the attention metadata, all built once as tensors. Logits are computed
only at the last token of sequences whose prompt is fully computed (the ones that sample).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from qwenkit.engine.kv_cache import KVCache
from qwenkit.engine.paged_attention import PagedAttentionMetadata, SequenceGroup
from qwenkit.engine.sampler import Sampler, SamplerOutput
from qwenkit.engine.scheduler import SchedulerOutput
from qwenkit.engine.sequence import Sequence


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # (N,)
    positions: torch.Tensor  # (N,)
    attn_metadata: PagedAttentionMetadata
    sample_index: torch.Tensor  # (S_sample,) flat index of the last token of each sampling seq
    sample_seqs: list[Sequence]


class ModelRunner:
    def __init__(
        self,
        model: nn.Module,
        kv_cache: KVCache,
        *,
        eos_token_ids: tuple[int, ...] = (),
        streaming_window: int | None = None,
        num_sink_tokens: int = 0,
    ) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = kv_cache.block_size
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.eos_token_ids = tuple(eos_token_ids)
        self.streaming_window = streaming_window
        self.num_sink_tokens = num_sink_tokens if streaming_window is not None else 0
        self.sampler = Sampler()

    def prepare(self, out: SchedulerOutput) -> StepInputs:
        seqs, num_new = out.seqs, out.num_new_tokens
        input_ids: list[int] = []
        starts: list[int] = []
        sample_index: list[int] = []
        sample_seqs: list[Sequence] = []
        flat = 0
        for seq, n in zip(seqs, num_new):
            c = seq.num_cached_tokens
            input_ids.extend(seq.token_ids[c : c + n])
            starts.append(c)
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
        return StepInputs(
            input_ids=torch.tensor(input_ids, dtype=torch.long, device=dev),
            positions=positions.to(dev),
            attn_metadata=metadata,
            sample_index=torch.tensor(sample_index, dtype=torch.long, device=dev),
            sample_seqs=sample_seqs,
        )

    @torch.inference_mode()
    def run(self, out: SchedulerOutput) -> tuple[list[Sequence], SamplerOutput | None]:
        """One forward over the scheduled tokens; returns the sampling sequences and samples."""
        inputs = self.prepare(out)
        hidden = self.model.hidden_states(inputs.input_ids, inputs.positions, inputs.attn_metadata)
        if not inputs.sample_seqs:
            return [], None
        logits = self.model.compute_logits(hidden[inputs.sample_index])  # (S_sample, V)
        return inputs.sample_seqs, self.sample(logits, inputs.sample_seqs)

    def sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> SamplerOutput:
        params = [s.sampling_params for s in seqs]
        penalised = any(
            p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1.0 for p in params
        )
        # Token histories are only materialised when some row applies a penalty.
        prompt_ids = [s.prompt_token_ids if penalised else [] for s in seqs]
        output_ids = [s.output_token_ids if penalised else [] for s in seqs]
        vocab = logits.shape[-1]
        forbidden = [[t for t in self._forbidden(s) if t < vocab] for s in seqs]
        generators = [s.generator for s in seqs]
        return self.sampler(logits, params, prompt_ids, output_ids, generators, forbidden)

    def _forbidden(self, seq: Sequence) -> list[int]:
        """Stop ids are masked until `min_tokens` tokens were generated."""
        p = seq.sampling_params
        if seq.num_output_tokens >= p.min_tokens:
            return []
        ids = list(p.stop_token_ids)
        if not p.ignore_eos:
            ids.extend(self.eos_token_ids)
        return ids
