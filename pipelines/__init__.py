"""Runnable entrypoints for `ray job submit` (python -m pipelines.<name>) and their run configs."""
