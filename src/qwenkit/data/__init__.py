"""Training data on disk: record readers (JSONL / Parquet / `datasets` folders) and the
tokenized shard format that `qwenkit train` reads and the data pipeline writes."""
