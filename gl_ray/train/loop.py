"""The GrowLength training loop: every stage of the plan in order, one optimizer step at a time.

It knows nothing of Ray: a `WorkerIO` (gl_ray.train.io) gives it data, reporting and collectives, and `RunHooks`
let the caller keep logs and exports. The loop reads like torchtitan's `Trainer.train`: a step, then one decision
(log / eval / checkpoint / stage done), then the report.

    state = Trainer(cfg, plan, io, vocab_size=8192, eos_id=0, evaluator=ev).train()
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from dataclasses import dataclass

import torch

from gl_ray.attention import attention_route, check_attention_here
from gl_ray.config import Config
from gl_ray.errors import TrainingDiverged
from gl_ray.devices import autocast_for, pick_device
from gl_ray.architectures import ModelSpec, spec_for
from gl_ray.model import batch_inputs, build_from_spec, document_pairs, lm_loss, set_rope_theta, training_flops
from gl_ray.schedule import Plan, Stage, lr_at, micro_batch_for
from gl_ray.sizes import parse_size
from gl_ray.train.checkpoint import TrainState
from gl_ray.train.compiling import compile_model, graph_budget
from gl_ray.train.faults import maybe_fail, maybe_poison, maybe_spike
from gl_ray.train.io import RunHooks, WorkerIO
from gl_ray.train.micro_batch import probe_micro_batch
from gl_ray.train.parallel import full_state_dict, is_sharded
from gl_ray.train.rewind import REWIND_HINT, apply_skip
from gl_ray.train.step import make_optimizer, train_step
from gl_ray.train.validation import Evaluator


NOTICE_GRACE_S = 60.0  # how long after a preemption notice's deadline the workers wait for the restart
NOTICE_NO_DEADLINE_S = 120.0  # Ray Train's deadline for a notice that gives none (DEFAULT_PREEMPTION_DEADLINE_S)


def pose_generator(seed: int, step: int, rank: int, micro: int) -> torch.Generator:
    """Stateless per-micro-batch generator, so PoSE position ids replay exactly after a resume."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 1009 + rank) * 101 + micro)


def step_inputs(x: torch.Tensor, st: Stage, micro: int, *, position_mode: str, seed: int, step: int, rank: int,
                final_len: int, eos_id: int | None, attention: str, device: torch.device) -> tuple[dict, object]:
    """lm_loss keyword arguments of a training micro batch (position ids, PoSE draws seeded by step, rank and micro
    batch, document masks), built from its rows x on the host and handed to the device without waiting for it;
    and the attention pairs it computes, for FLOPs (within documents and the window; a 0-d device tensor when
    masked). `benchmarks/sync_check.py` runs the step with exactly these inputs."""
    gen = pose_generator(seed, step, rank, micro) if position_mode == "pose" else None
    seq_len = x.shape[1]  # the stage's length; with data.packing=decompose, the step's bucket
    inputs = batch_inputs(x, position_mode=position_mode, seq_len=seq_len, final_len=final_len, generator=gen,
                          eos_id=eos_id, attention=attention, window=st.window, device=device)
    docs = inputs["docs"]
    return inputs, document_pairs(docs.starts, st.window) if docs is not None else x.shape[0] * seq_len ** 2


class Meter:
    """Statistics of the window between two reports: tokens, summed step losses and gradient norms, this worker's
    FLOPs, data wait, wall time, and the first step whose loss or gradient norm was not finite."""

    def __init__(self, device: torch.device):
        self.device = device
        self.reset(time.perf_counter())

    def reset(self, now: float) -> None:
        self.t0, self.tokens, self.wait_s, self.steps = now, 0, 0.0, 0
        # [summed step losses, FLOPs, summed gradient norms]: on device (no host sync per step), float64 (FLOPs
        # reach 1e20); first_bad: the first non-finite step of the window, -1 if none
        self.sums = torch.zeros(3, dtype=torch.float64, device=self.device)
        self.first_bad = torch.full((), -1, dtype=torch.long, device=self.device)

    def add(self, step: int, tokens: int, loss: torch.Tensor, grad_norm: torch.Tensor, flops, wait_s: float,
            skipped: bool = False) -> None:
        self.tokens, self.wait_s = self.tokens + tokens, self.wait_s + wait_s
        if skipped:  # train.nonfinite=skip left its update out: its loss and norm are not the window's
            return
        self.steps += 1
        self.sums[0] += loss
        self.sums[1] += flops
        self.sums[2] += grad_norm
        bad = ~(torch.isfinite(loss) & torch.isfinite(grad_norm)) & (self.first_bad < 0)
        self.first_bad = torch.where(bad, torch.full_like(self.first_bad, step), self.first_bad)

    def read(self, now: float, io: WorkerIO) -> dict:
        """loss and grad_norm (means over steps; loss also over workers), flops (all workers), tokens_per_s,
        data_wait_frac of the window, and first_bad_step (the first step, over workers, with a non-finite loss or
        gradient norm; None if none)."""
        steps = max(1, self.steps)
        sums = io.all_reduce_sum(self.sums / torch.tensor([steps, 1.0, steps], device=self.device,
                                                          dtype=torch.float64))
        bad = io.all_reduce_sum(torch.stack([(self.first_bad >= 0).double(),
                                             torch.where(self.first_bad >= 0, self.first_bad, 0).double()]))
        span = max(1e-9, now - self.t0)
        counted = self.steps > 0  # a window of skipped steps only has no loss (NaN, null in metrics.jsonl)
        return {"loss": float(sums[0]) / io.world_size if counted else math.nan, "flops": float(sums[1]),
                "grad_norm": float(sums[2]) / io.world_size if counted else math.nan,
                "tokens_per_s": self.tokens / span,
                "data_wait_frac": self.wait_s / span,
                "first_bad_step": int(bad[1] / bad[0]) if bad[0] > 0 else None}


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
                 evaluator: Evaluator, hooks: RunHooks | None = None, spec: ModelSpec | None = None):
        """spec: the run's model (RUN/model.json); None: model.preset's."""
        self.cfg, self.plan, self.io, self.evaluator = cfg, plan, io, evaluator
        self.hooks = hooks or RunHooks()
        self.device = pick_device(cfg.train.device)
        self.amp = autocast_for(self.device, cfg.train.precision)
        torch.manual_seed(cfg.train.seed)
        m = cfg.model
        self.eos_id = eos_id if cfg.data.document_masking else None  # None: documents are not masked
        # the backend this worker runs (masked rows on CUDA: flex, not sdpa), checked here, where it runs
        self.attention = attention_route(m.attention, masked=cfg.data.document_masking or plan.window_mode,
                                         on_gpu=self.device.type == "cuda").attention
        check_attention_here(self.attention, self.device)
        evaluator.attention = self.attention
        self.spec = spec or spec_for(m, vocab_size=vocab_size, eos_id=eos_id, final_len=plan.final_len)
        self.model = build_from_spec(self.spec, attention=self.attention, seed=cfg.train.seed,
                                     activation_checkpointing=cfg.train.activation_checkpointing).to(self.device)
        self.net = io.wrap_model(self.model)  # DDP wraps it; FSDP shards it in place (so before the optimizer)
        self.optimizer = make_optimizer(self.model, cfg.optim)
        restored = io.restore(self.model, self.optimizer)
        self.hooks.on_restore(restored, io.all_gather_object(io.node_id()))
        self.state = restored or TrainState(stage_wall_s=[0.0] * len(plan.stages), strategy=cfg.ray.strategy)
        if restored:
            apply_skip(io.run_uri, self.state, plan)  # a rewind's --skip-steps, if it is this one
        if cfg.train.compile:  # after DDP or FSDP (gl_ray.train.compiling); eval and export use the plain `model`
            self.net = compile_model(self.net, self.model, graphs=graph_budget(plan, cfg))
        self.t_start, self.elapsed0 = time.perf_counter(), self.state.elapsed_s
        self.final_val: dict = {}
        self.vocab_size = vocab_size
        self.step_pairs = 0  # query-key pairs of this worker's current step (a tensor with document masking)
        self.last_checkpoint_step = self.state.step if restored else 0
        self.checkpoint_block_s: float | None = None  # how long the last checkpoint held the loop up
        self.stopped = False  # a stop request ended the run early (after a checkpoint)
        self.notice_seen = False  # a preemption notice was answered, and its node not taken
        self.window_lens: list[int] = []  # data.packing=decompose: the bucket of each step since the last report

    def train(self) -> TrainState:
        """Run what is left of the plan, then export; a stop request (SIGTERM) ends it after a checkpoint at the
        current step, without the export (`self.stopped`)."""
        try:
            for stage in self.plan.stages[self.state.stage:]:
                self.run_stage(stage)
                if self.stopped:
                    self.io.flush()
                    self.hooks.on_abort()
                    return self.state
                if self.plan.time_mode and self.state.elapsed_s >= self.plan.budget_time_s:
                    break
            self.io.flush()  # checkpoints written in the background are complete before the run ends
        except BaseException:
            with contextlib.suppress(Exception):  # the checkpoints before a failure are kept; its error wins
                self.io.flush()
            self.hooks.on_abort()
            raise
        sharded = is_sharded(self.model)  # then gathering the weights is a collective: every rank takes part
        weights = full_state_dict(self.model) if sharded or self.io.rank == 0 else {}
        self.hooks.on_finish(self.model, weights, self.state, self.final_val)
        return self.state

    def run_stage(self, st: Stage) -> None:
        state = self.state
        if state.stage_step >= st.steps and not self.plan.time_mode:  # finished before a restart
            state.stage, state.stage_step = st.index + 1, 0
            return
        if st.rope_theta:  # schedule.rope_theta: this stage's base (also after a resume into the stage)
            set_rope_theta(self.model, st.rope_theta)
        micro_batch = self.micro_batch(st)
        batches = self.io.batches(st, state.stage_step)
        stage_t0, stage_wall0 = time.perf_counter(), state.stage_wall_s[st.index]
        meter = Meter(self.device)
        while state.stage_step < st.steps:
            maybe_fail(state.step, self.io.rank)
            poison = maybe_poison(state.step, self.model)
            maybe_spike(state.step, self.model)
            lr = self.set_lr()
            out = train_step(self.net, self.optimizer, batches, micro_batch=self.step_micro_batch(st, micro_batch),
                             device=self.device,
                             amp=self.amp, grad_clip=self.cfg.optim.grad_clip,
                             extra_inputs=lambda x, micro: self.extra_inputs(x, st, micro),
                             skip_nonfinite=self.cfg.train.nonfinite == "skip")
            if poison is not None:
                poison.remove()
            flops = training_flops(self.spec.shape, st.rows_per_rank_step * st.seq_len,
                                   self.step_pairs)
            self.step_pairs = 0
            tokens_before = state.tokens
            now = self.advance(st, stage_t0, stage_wall0)
            if out.skipped:
                self.count_skipped()
            meter.add(state.step, self.plan.tokens_per_step, out.loss, out.grad_norm, flops, out.wait_s, out.skipped)
            stop, late, notice = self.meet(st)
            due = decide(self.cfg, state.step, tokens_before, state.tokens, state.stage_step >= st.steps or late,
                         last_stage=st.index == len(self.plan.stages) - 1)
            if stop or notice is not None:  # every worker checkpoints at this step
                self.stopped = stop
                due = Due(log=True, eval=due.eval, checkpoint=True, stage_done=due.stage_done)
            if due.log:
                window = meter.read(now, self.io)
                if window["first_bad_step"] is not None:  # before anything of this state is reported or saved
                    raise self.diverged(window["first_bad_step"])
                if self.spiked(window["loss"]):  # the same: the newest checkpoint is always from before it
                    raise self.spike(window["loss"])
                self.report(st, due, window | {"lr": lr, "micro_batch": micro_batch})
                meter.reset(now)  # the next window starts now: eval, checkpoint and report time count against it
            if notice is not None:
                self.wait_for_preemption(notice)
                meter.reset(time.perf_counter())
            if due.stage_done or self.stopped:
                break

    def wait_for_preemption(self, deadline_s: float) -> None:
        """After the checkpoint at a preemption notice: wait for Ray Train to restart the workers without the
        drained node (at its deadline), so no step is trained twice. Still here NOTICE_GRACE_S after the deadline
        (Ray Train's own, NOTICE_NO_DEADLINE_S after the notice, if it gave none): no restart is coming, training
        goes on."""
        self.hooks.on_notice(self.state.step, deadline_s)
        self.io.flush()
        end = (deadline_s or time.time() + NOTICE_NO_DEADLINE_S) + NOTICE_GRACE_S
        while time.time() < end:
            time.sleep(0.2)
        self.notice_seen = True  # this notice is spent; the workers train on

    def step_micro_batch(self, st: Stage, micro_batch: int):
        """The stage's micro batch; with data.packing=decompose, a function of the step's rows: as many of its
        bucket's rows as the stage's micro batch tokens hold (a divisor of its rows), and the bucket is noted."""
        if self.cfg.data.packing != "decompose":
            return micro_batch

        def of(rows) -> int:
            self.window_lens.append(rows.shape[1])
            return micro_batch_for(len(rows), rows.shape[1], micro_batch * st.seq_len)
        return of

    def diverged(self, step: int) -> TrainingDiverged:
        return TrainingDiverged(
            f"the loss or gradient norm became NaN or infinite at step {step}; the run stopped without saving that "
            f"state ({self.checkpoint_note()}). Lower optim.lr, check model.rope_theta and the data, or set "
            f"train.nonfinite=skip; {REWIND_HINT}")

    def spiked(self, loss: float) -> bool:
        """The loss-spike rule: this window's loss above train.spike_factor x the median of the last
        train.spike_windows windows (once 3 are known). Window losses are averaged over workers, so every worker
        decides the same."""
        factor, recent = self.cfg.train.spike_factor, self.state.recent_losses
        return bool(factor) and len(recent) >= 3 and loss > factor * statistics.median(recent)

    def spike(self, loss: float) -> TrainingDiverged:
        median = statistics.median(self.state.recent_losses)
        return TrainingDiverged(
            f"the loss spiked at step {self.state.step}: {loss:.4g}, above train.spike_factor="
            f"{self.cfg.train.spike_factor:g} x {median:.4g} (the median of the last "
            f"{len(self.state.recent_losses)} report windows); the run stopped without saving that state "
            f"({self.checkpoint_note()}). Lower optim.lr and run the same command, or {REWIND_HINT}; "
            "train.spike_factor=0 turns the rule off")

    def checkpoint_note(self) -> str:
        last = self.last_checkpoint_step
        return f"the newest checkpoint is step {last}, from before it" if last else "no checkpoint was written"

    def count_skipped(self) -> None:
        """train.nonfinite=skip: a step whose gradient norm was not finite made no update; too many stop the run."""
        self.state.skipped_steps += 1
        if self.state.skipped_steps > self.cfg.train.max_skipped_steps:
            raise TrainingDiverged(
                f"{self.state.skipped_steps} steps skipped for a non-finite gradient norm (the last: step "
                f"{self.state.step}), more than train.max_skipped_steps={self.cfg.train.max_skipped_steps}; the run "
                "stopped. Lower optim.lr or check the data")

    def micro_batch(self, st: Stage) -> int:
        """Sequences per forward pass in this stage: the plan's, or with micro_batch_tokens auto the largest whose
        step fits on every worker (gl_ray.train.micro_batch), found now and logged with every report."""
        if not self.plan.auto_micro_batch:
            return st.micro_batch
        budget = parse_size(self.cfg.train.memory_budget, "train.memory_budget") if self.cfg.train.memory_budget \
            else 0
        x = torch.arange(st.rows_per_rank_step * st.seq_len).reshape(-1, st.seq_len) % self.vocab_size
        seqs = probe_micro_batch(self.model, self.optimizer, rows_per_step=st.rows_per_rank_step, seq_len=st.seq_len,
                                 run=lambda n: self.try_micro_batch(x[:n].to(self.device), st), device=self.device,
                                 budget_bytes=budget, host_sum=self.io.all_reduce_host_sum)
        self.evaluator.micro_batch_tokens = seqs * st.seq_len
        return seqs

    def try_micro_batch(self, x: torch.Tensor, st: Stage) -> None:
        """One forward+backward of x as a step would run it, gradients then dropped: weights, optimizer, RNG and
        the data are untouched, so trying does not change the run. On the unwrapped model: no DDP all-reduce, no
        recompile; FSDP's gathers run locally during a try (probe_micro_batch), so it runs no collective."""
        inputs = batch_inputs(x, position_mode=self.cfg.model.position_mode, seq_len=st.seq_len,
                              final_len=self.plan.final_len, generator=torch.Generator().manual_seed(0),
                              eos_id=self.eos_id, attention=self.attention, window=st.window)
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
        inputs, pairs = step_inputs(x, st, micro, position_mode=self.cfg.model.position_mode,
                                    seed=self.cfg.train.seed, step=self.state.step, rank=self.io.rank,
                                    final_len=self.plan.final_len, eos_id=self.eos_id,
                                    attention=self.attention, device=self.device)
        self.step_pairs += pairs
        return inputs

    def advance(self, st: Stage, stage_t0: float, stage_wall0: float) -> float:
        """Count the step just taken in the state; returns the time it ended."""
        s, now = self.state, time.perf_counter()
        s.step, s.stage_step, s.tokens = s.step + 1, s.stage_step + 1, s.tokens + self.plan.tokens_per_step
        s.elapsed_s = self.elapsed0 + now - self.t_start
        s.stage_wall_s[st.index] = stage_wall0 + now - stage_t0
        return now

    def meet(self, st: Stage) -> tuple[bool, bool, float | None]:
        """(stop, late, notice): whether any worker was asked to stop, in time mode whether the slowest worker's
        clock has passed the stage's share, and whether any worker got a preemption notice (then its deadline in
        Unix seconds as rank 0 saw it, 0 if unknown; else None). The workers agree on all three in one host
        all-reduce (gloo: no device sync), held only at steps every worker knows to be meeting points: report
        steps (every train.log_every_steps) and the stage's last planned step. So a SIGTERM or a notice is
        honoured, and a timed stage ends, within train.log_every_steps steps; between meetings no rank waits for
        another outside the gradient sync."""
        s = self.state
        if s.step % self.cfg.train.log_every_steps and s.stage_step < st.steps:
            return False, False, None
        late = self.plan.time_mode and s.elapsed_s >= self.plan.time_end_s(st.index)
        deadline = None if self.notice_seen else self.io.preemption_notice()
        stop, late_any, notices, rank0_deadline = self.io.all_reduce_host_sum(
            [float(self.io.stop_requested()), float(late), float(deadline is not None),
             (deadline or 0.0) if self.io.rank == 0 else 0.0])
        return stop > 0, late_any > 0, rank0_deadline if notices > 0 else None

    def report(self, st: Stage, due: Due, window: dict) -> None:
        s, plan = self.state, self.plan
        s.flops += window["flops"]
        metrics = {"step": s.step, "stage": st.index, "seq_len": st.seq_len, "tokens": s.tokens,
                   "loss": window["loss"], "lr": window["lr"], "tokens_per_s": window["tokens_per_s"],
                   "data_wait_frac": window["data_wait_frac"], "micro_batch": window["micro_batch"],
                   "grad_norm": window["grad_norm"], "skipped_steps": s.skipped_steps,
                   "elapsed_s": s.elapsed_s, "flops": s.flops, "world_size": self.io.world_size,
                   "total_tokens": plan.total_tokens, "num_stages": len(plan.stages)}
        if plan.time_mode:
            metrics["budget_time_s"] = plan.budget_time_s
        if plan.window_mode:
            metrics["window"] = st.window or st.seq_len
        if self.cfg.data.packing == "decompose":  # the bucket length of each step of the window
            metrics["bucket_lens"], self.window_lens = self.window_lens, []
        if due.eval:
            metrics["val_loss"] = self.evaluator.loss(self.model, st.seq_len, self.io, self.device, self.amp)
            metrics["val_loss_final_len"] = self.evaluator.loss(self.model, plan.final_len, self.io, self.device,
                                                                self.amp)
            self.final_val = metrics
        if due.stage_done:
            s.stage, s.stage_step = st.index + 1, 0
        if math.isfinite(window["loss"]):
            s.recent_losses = (s.recent_losses + [window["loss"]])[-self.cfg.train.spike_windows:]
        if self.checkpoint_block_s is not None:  # the previous checkpoint's wait, known only after its report
            metrics["checkpoint_block_s"], self.checkpoint_block_s = round(self.checkpoint_block_s, 4), None
        t0 = time.perf_counter()
        pending = self.io.snapshot(self.model, self.optimizer, s) if due.checkpoint else None
        block = time.perf_counter() - t0
        self.hooks.on_report(metrics)  # the metrics line before the checkpoint: a resume at this step keeps it
        t0 = time.perf_counter()
        self.io.report(metrics, checkpoint=pending)
        if due.checkpoint:
            self.last_checkpoint_step = s.step
            self.checkpoint_block_s = block + time.perf_counter() - t0
