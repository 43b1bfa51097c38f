"""Validation loss during training: the first data.eval_tokens tokens of the val split, cut into rows of any length,
the same rows at every evaluation (`Evaluator.loss`, called by the loop on every worker at once)."""

from __future__ import annotations

import math

import numpy as np
import torch

from gl_ray.data.stream import TokenStream
from gl_ray.model import window_forward
from gl_ray.train.io import WorkerIO


class Evaluator:
    """Validation loss on the first data.eval_tokens tokens of the val split, cut at any length; with `eos_id`
    (document masking) each row is masked by its documents, as in training."""

    def __init__(self, val: TokenStream, eval_tokens: int, micro_batch_tokens: int, *, eos_id: int | None = None,
                 attention: str = "sdpa"):
        self.tokens = np.array(val.read(0, min(eval_tokens, val.tokens)))  # own, writable copy
        self.micro_batch_tokens = micro_batch_tokens
        self.eos_id, self.attention = eos_id, attention

    @torch.no_grad()
    def loss(self, model, seq_len: int, io: WorkerIO, device, amp) -> float:
        n = len(self.tokens) // seq_len
        every = torch.from_numpy(self.tokens[: n * seq_len].reshape(n, seq_len))
        rows = every[io.rank:: io.world_size]
        mb = max(1, self.micro_batch_tokens // seq_len)
        passes = math.ceil(math.ceil(n / io.world_size) / mb)  # the same on every worker (FSDP gathers in each)
        total = torch.zeros(2, dtype=torch.float64, device=device)  # [sum of row losses, rows]
        was_training = model.training
        model.eval()
        for i in range(passes):
            x = rows[i * mb: (i + 1) * mb]
            counted = len(x)
            x = (x if counted else every[:1]).to(device, dtype=torch.long)  # out of rows: a pass not counted
            with amp():
                out, _ = window_forward(model, x, eos_id=self.eos_id, attention=self.attention)
                total[0] += out.loss.double() * counted
            total[1] += counted
        model.train(was_training)
        total = io.all_reduce_sum(total)
        return float(total[0] / total[1]) if total[1] > 0 else float("nan")
