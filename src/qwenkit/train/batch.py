"""The unit of work of the trainer loop: packed rows with per-document targets and positions."""
from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE_INDEX = -100


@dataclass
class Batch:
    """Rows of packed documents; every tensor is (B, T).

    input_ids: token ids (padding = 0).
    targets: the token each position predicts, shifted within its document; IGNORE_INDEX where
        there is no loss (prompt tokens, a document's last token, padding).
    position_ids: 0, 1, ... restarting at each document (RoPE positions).
    document_ids: which document of the row a token belongs to (0, 1, ...); -1 for padding.
        Attention is causal within a document and never crosses documents.
    """

    input_ids: torch.Tensor
    targets: torch.Tensor
    position_ids: torch.Tensor
    document_ids: torch.Tensor

    @property
    def num_target_tokens(self) -> int:
        return int((self.targets != IGNORE_INDEX).sum())

    @property
    def num_units(self) -> int:
        """What the loss is normalised by (objectives' batches define their own: pairs, ...)."""
        return self.num_target_tokens

    @property
    def num_tokens(self) -> int:
        return int((self.document_ids >= 0).sum())

    def to(self, device: torch.device | str) -> Batch:
        return Batch(*(t.to(device, non_blocking=True) for t in
                       (self.input_ids, self.targets, self.position_ids, self.document_ids)))
