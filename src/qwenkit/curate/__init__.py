"""Data curation stages that need the engine or eval (above them in the layers): the pipeline's
stages and YAML runner, decontamination benchmarks, the LLM judge and the execution filter.
The generic datatrove steps live in :mod:`qwenkit.data.pipeline`."""
