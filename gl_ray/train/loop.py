"""The GrowLength training loop: every stage of the plan in order, one optimizer step at a time.

It knows nothing of Ray: a `WorkerIO` (gl_ray.train.io) gives it data, reporting and collectives, and `RunHooks`
let the caller keep logs and exports. The loop reads like torchtitan's `Trainer.train`: a step, then one decision
(log / eval / checkpoint / stage done), then the report.

    state = Trainer(cfg, plan, io, vocab_size=8192, eos_id=0, evaluator=ev).train()
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from gl_ray.config import Config, parse_size
from gl_ray.data.stream import TokenStream
from gl_ray.devices import autocast_for, pick_device
from gl_ray.model import batch_inputs, build_model, document_pairs, lm_loss, training_flops
from gl_ray.schedule import Plan, Stage, lr_at
from gl_ray.train.checkpoint import TrainState
from gl_ray.train.faults import maybe_fail
from gl_ray.train.io import RunHooks, WorkerIO
from gl_ray.train.micro_batch import find_micro_batch, too_small, try_fits
from gl_ray.train.parallel import full_state_dict
from gl_ray.train.step import make_optimizer, train_step


def pose_generator(seed: int, step: int, rank: int, micro: int) -> torch.Generator:
    """Stateless per-micro-batch generator, so PoSE position ids replay exactly after a resume."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 1009 + rank) * 101 + micro)


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
        rows = torch.from_numpy(self.tokens[: n * seq_len].reshape(n, seq_len))[io.rank:: io.world_size]
        mb = max(1, self.micro_batch_tokens // seq_len)
        total = torch.zeros(2, dtype=torch.float64, device=device)  # [sum of row losses, rows]
        was_training = model.training
        model.eval()
        for i in range(0, len(rows), mb):
            x = rows[i: i + mb].to(device, dtype=torch.long)
            inputs = batch_inputs(x, position_mode="extrapolate", seq_len=seq_len, final_len=seq_len,
                                  eos_id=self.eos_id, attention=self.attention)
            with amp():
                total[0] += lm_loss(model, x, **inputs).double() * len(x)
            total[1] += len(x)
        model.train(was_training)
        total = io.all_reduce_sum(total)
        return float(total[0] / total[1]) if total[1] > 0 else float("nan")


class Meter:
    """Statistics of the window between two reports: tokens, summed step losses, this worker's FLOPs, data wait,
    wall time."""

    def __init__(self, device: torch.device):
        self.device = device
        self.reset(time.perf_counter())

    def reset(self, now: float) -> None:
        self.t0, self.tokens, self.wait_s, self.steps = now, 0, 0.0, 0
        # [summed step losses, FLOPs]: stay on device (no host sync per step), float64 (FLOPs reach 1e20)
        self.sums = torch.zeros(2, dtype=torch.float64, device=self.device)

    def add(self, tokens: int, loss: torch.Tensor, flops, wait_s: float) -> None:
        self.tokens, self.steps, self.wait_s = self.tokens + tokens, self.steps + 1, self.wait_s + wait_s
        self.sums[0] += loss
        self.sums[1] += flops

    def read(self, now: float, io: WorkerIO) -> dict:
        """loss (mean over steps and workers), flops (all workers), tokens_per_s and data_wait_frac of the window."""
        sums = io.all_reduce_sum(self.sums / torch.tensor([max(1, self.steps), 1.0], device=self.device,
                                                          dtype=torch.float64))
        span = max(1e-9, now - self.t0)
        return {"loss": float(sums[0]) / io.world_size, "flops": float(sums[1]), "tokens_per_s": self.tokens / span,
                "data_wait_frac": self.wait_s / span}


@dataclass(frozen=True)
class Due:
    """What is due after a step."""

    log: bool
    eval: bool
    checkpoint: bool
    stage_done: bool


def _crossed(before: int, after: int, every: int) -> bool:
    return every > 0 and before // every != after // every


def decide(cfg: Config, step: int, tokens_before: int, tokens: int, stage_done: bool, last_stage: bool) -> Due:
    """Log, evaluate and checkpoint when their token or step intervals are crossed; checkpoint at each stage end,
    evaluate at the end of the run, and log whenever anything else happens."""
    t = cfg.train
    checkpoint = stage_done or _crossed(tokens_before, tokens, t.checkpoint_every_tokens)
    evaluate = (stage_done and last_stage) or _crossed(tokens_before, tokens, t.eval_every_tokens)
    log = step % t.log_every_steps == 0 or stage_done or evaluate or checkpoint
    return Due(log=log, eval=evaluate, checkpoint=checkpoint, stage_done=stage_done)


class Trainer:
    """Model, optimizer and state of one worker, built and restored once; `train()` runs what is left of the plan."""

    def __init__(self, cfg: Config, plan: Plan, io: WorkerIO, *, vocab_size: int, eos_id: int,
                 evaluator: Evaluator, hooks: RunHooks | None = None):
        self.cfg, self.plan, self.io, self.evaluator = cfg, plan, io, evaluator
        self.hooks = hooks or RunHooks()
        self.device = pick_device(cfg.train.device)
        self.amp = autocast_for(self.device, cfg.train.precision)
        torch.manual_seed(cfg.train.seed)
        m = cfg.model
        self.eos_id = eos_id if cfg.data.document_masking else None  # None: documents are not masked
        self.model = build_model(m.preset, vocab_size, m.max_position_embeddings, m.rope_theta, m.init_std, eos_id,
                                 seed=cfg.train.seed, attention=m.attention,
                                 activation_checkpointing=cfg.train.activation_checkpointing).to(self.device)
        self.net = io.wrap_model(self.model)  # DDP wraps it; FSDP shards it in place (so before the optimizer)
        self.optimizer = make_optimizer(self.model, cfg.optim)
        restored = io.restore(self.model, self.optimizer)
        self.hooks.on_restore(restored)
        self.state = restored or TrainState(stage_wall_s=[0.0] * len(plan.stages), strategy=cfg.ray.strategy)
        if cfg.train.compile:  # after DDP, so it can overlap gradient all-reduce; one static graph per stage length.
            self.net = torch.compile(self.net, dynamic=False)  # Checkpoints, eval and export use the plain `model`.
        self.t_start, self.elapsed0 = time.perf_counter(), self.state.elapsed_s
        self.final_val: dict = {}
        self.vocab_size = vocab_size
        self.step_pairs = 0  # query-key pairs of this worker's current step (a tensor with document masking)

    def train(self) -> TrainState:
        for stage in self.plan.stages[self.state.stage:]:
            self.run_stage(stage)
            if self.plan.time_mode and self.state.elapsed_s >= self.plan.budget_time_s:
                break
        weights = full_state_dict(self.model)  # a collective when sharded: every rank takes part
        self.hooks.on_finish(self.model, weights, self.state, self.final_val)
        return self.state

    def run_stage(self, st: Stage) -> None:
        state = self.state
        if state.stage_step >= st.steps and not self.plan.time_mode:  # finished before a restart
            state.stage, state.stage_step = st.index + 1, 0
            return
        micro_batch = self.micro_batch(st)
        batches = self.io.batches(st, state.stage_step)
        stage_t0, stage_wall0 = time.perf_counter(), state.stage_wall_s[st.index]
        meter = Meter(self.device)
        while state.stage_step < st.steps:
            maybe_fail(state.step, self.io.rank)
            lr = self.set_lr()
            loss, wait_s = train_step(self.net, self.optimizer, batches, micro_batch=micro_batch,
                                      device=self.device, amp=self.amp, grad_clip=self.cfg.optim.grad_clip,
                                      extra_inputs=lambda x, micro: self.extra_inputs(x, st, micro))
            flops = training_flops(self.cfg.model.preset, self.vocab_size, st.rows_per_rank_step * st.seq_len,
                                   self.step_pairs)
            self.step_pairs = 0
            tokens_before = state.tokens
            now = self.advance(st, stage_t0, stage_wall0)
            meter.add(self.plan.tokens_per_step, loss, flops, wait_s)
            due = decide(self.cfg, state.step, tokens_before, state.tokens, self.stage_done(st),
                         last_stage=st.index == len(self.plan.stages) - 1)
            if due.log:
                self.report(st, due, meter.read(now, self.io) | {"lr": lr, "micro_batch": micro_batch})
                meter.reset(now)  # the next window starts now: eval, checkpoint and report time count against it
            if due.stage_done:
                break

    def micro_batch(self, st: Stage) -> int:
        """Sequences per forward pass in this stage: the plan's, or with micro_batch_tokens auto the largest that
        fits on every worker (gl_ray.train.micro_batch), found now and logged with every report."""
        if not self.plan.auto_micro_batch:
            return st.micro_batch
        budget = parse_size(self.cfg.train.memory_budget, "train.memory_budget") if self.cfg.train.memory_budget \
            else 0
        x = torch.arange(st.rows_per_rank_step * st.seq_len).reshape(-1, st.seq_len) % self.vocab_size

        def fits_everywhere(seqs: int) -> bool:
            ok = try_fits(lambda: self.try_micro_batch(x[:seqs].to(self.device), st), seqs, self.device, budget)
            failed = self.io.all_reduce_sum(torch.tensor([0.0 if ok else 1.0], device=self.device))
            return float(failed) == 0  # every worker takes the same path through the search

        seqs = find_micro_batch(st.rows_per_rank_step, fits_everywhere)
        if seqs == 0:
            raise too_small(budget, st.seq_len, sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel()
                                                    for p in self.model.parameters()))
        self.evaluator.micro_batch_tokens = seqs * st.seq_len
        return seqs

    def try_micro_batch(self, x: torch.Tensor, st: Stage) -> None:
        """One forward+backward of x as a step would run it, gradients then dropped: weights, optimizer, RNG and
        the data are untouched, so trying does not change the run. On the unwrapped model: no DDP all-reduce,
        no recompile (FSDP's own gathers remain, and every worker tries the same sizes in step)."""
        inputs = batch_inputs(x, position_mode=self.cfg.model.position_mode, seq_len=st.seq_len,
                              final_len=self.plan.final_len, generator=torch.Generator().manual_seed(0),
                              eos_id=self.eos_id, attention=self.cfg.model.attention)
        try:
            with self.amp():
                loss = lm_loss(self.model, x, **inputs)
            loss.backward()
        finally:
            self.optimizer.zero_grad(set_to_none=True)

    def set_lr(self) -> float:
        """The LR of the next step (a function of tokens seen, or of the clock in time mode), set on the optimizer."""
        plan, o = self.plan, self.cfg.optim
        elapsed = self.elapsed0 + time.perf_counter() - self.t_start
        lr = lr_at(self.state.tokens + plan.tokens_per_step, o.lr, o.min_lr, o.warmup_tokens, plan.total_tokens,
                   elapsed / plan.budget_time_s if plan.time_mode else None)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def extra_inputs(self, x: torch.Tensor, st: Stage, micro: int) -> dict:
        """Position ids (PoSE draws are seeded by step, rank and micro batch) and document masks of a micro batch."""
        gen = pose_generator(self.cfg.train.seed, self.state.step, self.io.rank, micro)
        inputs = batch_inputs(x, position_mode=self.cfg.model.position_mode, seq_len=st.seq_len,
                              final_len=self.plan.final_len, generator=gen, eos_id=self.eos_id,
                              attention=self.cfg.model.attention)
        docs = inputs["docs"]  # FLOPs count the pairs attention computes: within documents when masked
        self.step_pairs += document_pairs(docs.starts) if docs is not None else x.shape[0] * st.seq_len ** 2
        return inputs

    def advance(self, st: Stage, stage_t0: float, stage_wall0: float) -> float:
        """Count the step just taken in the state; returns the time it ended."""
        s, now = self.state, time.perf_counter()
        s.step, s.stage_step, s.tokens = s.step + 1, s.stage_step + 1, s.tokens + self.plan.tokens_per_step
        s.elapsed_s = self.elapsed0 + now - self.t_start
        s.stage_wall_s[st.index] = stage_wall0 + now - stage_t0
        return now

    def stage_done(self, st: Stage) -> bool:
        done = self.state.stage_step >= st.steps
        if self.plan.time_mode:  # every rank must switch at the same step: agree on the clock of the slowest,
            late = float(self.state.elapsed_s >= self.plan.time_end_s(st.index))  # over the host, not the device
            done = done or self.io.all_reduce_host_sum(late) > 0
        return done

    def report(self, st: Stage, due: Due, window: dict) -> None:
        s, plan = self.state, self.plan
        s.flops += window["flops"]
        metrics = {"step": s.step, "stage": st.index, "seq_len": st.seq_len, "tokens": s.tokens,
                   "loss": window["loss"], "lr": window["lr"], "tokens_per_s": window["tokens_per_s"],
                   "data_wait_frac": window["data_wait_frac"], "micro_batch": window["micro_batch"],
                   "elapsed_s": s.elapsed_s, "flops": s.flops,
                   "total_tokens": plan.total_tokens, "num_stages": len(plan.stages)}
        if plan.time_mode:
            metrics["budget_time_s"] = plan.budget_time_s
        if due.eval:
            metrics["val_loss"] = self.evaluator.loss(self.model, st.seq_len, self.io, self.device, self.amp)
            metrics["val_loss_final_len"] = self.evaluator.loss(self.model, plan.final_len, self.io, self.device,
                                                                self.amp)
            self.final_val = metrics
        if due.stage_done:
            s.stage, s.stage_step = st.index + 1, 0
        self.hooks.on_report(metrics)
        self.io.report(metrics, checkpoint=(self.model, self.optimizer, s) if due.checkpoint else None)
