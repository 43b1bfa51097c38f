"""Data: corpus -> tokenizer -> Parquet token shards, and per-stage packed rows."""
