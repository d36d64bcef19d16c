"""The data pipeline's building blocks on datatrove: qwenkit's own pipeline steps
(:mod:`.steps`), text helpers (:mod:`.text`) and the job runner with its counts (:mod:`.run`).
The stages, the benchmark data, the LLM judge and the execution filter that need the engine or
eval live one layer up, in :mod:`qwenkit.curate`."""
