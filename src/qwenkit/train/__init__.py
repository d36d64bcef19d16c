"""`qwenkit train`: one trainer loop for pretraining, SFT and LoRA (and the preference / RL /
distillation recipes built on it), single process or torchrun (DDP / FSDP2).

The batch every recipe hands the loop (`qwenkit.train.batch.Batch`): packed rows of
`input_ids`, next-token `targets` already shifted per document (-100 = no loss), `position_ids`
restarting at 0 for each document, and `document_ids` (-1 = padding) from which attention is
block-diagonal causal.
"""
