"""Model parallelism over torch.distributed: tensor-parallel module swaps (`tp.py`), pipeline
stages by layer ranges (`pp.py`).

Plain torch on the model layer: the engine (`qwenkit.engine.parallel`) starts the processes,
runs the scheduler on rank 0 and broadcasts each step to the others.
"""
from qwenkit.parallel.pp import MicroBatch, apply_pipeline_parallel, run_first_stage, run_stage, stage_layers
from qwenkit.parallel.tp import (
    ParallelLMHead,
    RowParallelLinear,
    TensorParallelError,
    VocabParallelEmbedding,
    apply_tensor_parallel,
    check_tensor_parallel,
    local_kv_heads,
)

__all__ = [
    "MicroBatch",
    "ParallelLMHead",
    "RowParallelLinear",
    "TensorParallelError",
    "VocabParallelEmbedding",
    "apply_pipeline_parallel",
    "apply_tensor_parallel",
    "check_tensor_parallel",
    "local_kv_heads",
    "run_first_stage",
    "run_stage",
    "stage_layers",
]
