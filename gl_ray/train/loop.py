"""The GrowLength training loop: every stage of the plan in order, one optimizer step at a time.

It knows nothing of Ray: a `WorkerIO` gives it data, reporting and collectives. `gl_ray.train.ray_train` gives
one backed by Ray Train; `local_io` below runs it in one process (ray.num_workers: 0, GPU benchmarks).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from gl_ray.config import Config
from gl_ray.data.stream import TokenStream
from gl_ray.model import build_model, lm_loss, position_ids
from gl_ray.schedule import Plan, lr_at
from gl_ray.train.checkpoint import TrainState
from gl_ray.train.faults import maybe_fail


@dataclass
class WorkerIO:
    rank: int
    world_size: int
    batches: Callable[[int, int], Iterator[np.ndarray]]  # (stage, start_step) -> int32 [micro_batch, seq_len]
    report: Callable[..., None]  # report(metrics, checkpoint=(model, optimizer, state) | None)
    restore: Callable[[torch.nn.Module, torch.optim.Optimizer], TrainState | None]
    wrap_model: Callable[[torch.nn.Module], torch.nn.Module] = lambda m: m
    all_reduce_sum: Callable[[torch.Tensor], torch.Tensor] = lambda t: t


def pick_device(cfg: Config) -> torch.device:
    if cfg.train.device == "cuda" or (cfg.train.device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_initialized() else 0)
    return torch.device("cpu")


def autocast_for(cfg: Config, device: torch.device):
    bf16 = cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and device.type == "cuda")
    return (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext


def make_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.AdamW:
    """AdamW with Pythia's defaults; no weight decay on biases and LayerNorm weights (1-D tensors)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    o = cfg.optim
    return torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                             fused=True if decay[0].is_cuda else None)  # one fused kernel on GPU


def pose_generator(seed: int, step: int, rank: int, micro: int) -> torch.Generator:
    """Stateless per-micro-batch generator, so PoSE position ids replay exactly after a resume."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 1009 + rank) * 101 + micro)


class Evaluator:
    """Validation loss on the first data.eval_tokens tokens of the val split, cut at any length."""

    def __init__(self, val: TokenStream, eval_tokens: int, micro_batch_tokens: int):
        self.tokens = np.array(val.read(0, min(eval_tokens, val.tokens)))  # own, writable copy
        self.micro_batch_tokens = micro_batch_tokens

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
            with amp():
                total[0] += lm_loss(model, x).double() * len(x)
            total[1] += len(x)
        model.train(was_training)
        total = io.all_reduce_sum(total)
        return float(total[0] / total[1]) if total[1] > 0 else float("nan")


def _crossed(before: int, after: int, every: int) -> bool:
    return every > 0 and before // every != after // every


def run_training(cfg: Config, plan: Plan, vocab_size: int, eos_id: int, io: WorkerIO, evaluator: Evaluator,
                 on_finish: Callable[[torch.nn.Module, TrainState, dict], None] | None = None) -> TrainState:
    """Train every stage of the plan from the last checkpoint on; returns the final state."""
    device = pick_device(cfg)
    amp = autocast_for(cfg, device)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model.preset, vocab_size, cfg.model.max_position_embeddings, cfg.model.rope_theta,
                        cfg.model.init_std, eos_id, seed=cfg.train.seed).to(device)
    optimizer = make_optimizer(model, cfg)
    state = io.restore(model, optimizer) or TrainState(stage_wall_s=[0.0] * len(plan.stages))
    net = io.wrap_model(model)
    if cfg.train.compile:  # after DDP, so it can overlap gradient all-reduce; one static graph per stage length.
        net = torch.compile(net, dynamic=False)  # Checkpoints, eval and export use the plain `model`.
    t_start, elapsed0 = time.perf_counter(), state.elapsed_s
    final_val: dict = {}

    for st in plan.stages[state.stage:]:
        if state.stage_step >= st.steps and not plan.time_mode:
            state.stage, state.stage_step = st.index + 1, 0
            continue
        batches = io.batches(st.index, state.stage_step)
        stage_t0, stage_wall0 = time.perf_counter(), state.stage_wall_s[st.index]
        win_t0, win_tokens, win_wait, win_loss, win_steps = time.perf_counter(), 0, 0.0, 0.0, 0
        time_end = sum(s.time_s for s in plan.stages[: st.index + 1])
        while state.stage_step < st.steps:
            maybe_fail(state.step, io.rank)
            elapsed = elapsed0 + time.perf_counter() - t_start
            lr = lr_at(state.tokens + plan.tokens_per_step, cfg.optim.lr, cfg.optim.min_lr,
                       cfg.optim.warmup_tokens, plan.total_tokens,
                       elapsed / plan.budget_time_s if plan.time_mode else None)
            for group in optimizer.param_groups:
                group["lr"] = lr
            step_loss = torch.zeros((), device=device)
            for micro in range(st.grad_accum):
                t_wait = time.perf_counter()
                x = torch.from_numpy(np.require(next(batches), requirements="W")).to(device, dtype=torch.long)
                win_wait += time.perf_counter() - t_wait
                gen = pose_generator(cfg.train.seed, state.step, io.rank, micro)
                pos = position_ids(cfg.model.position_mode, x.shape[0], st.seq_len, plan.final_len, gen)
                pos = None if pos is None else pos.to(device)
                sync = micro == st.grad_accum - 1 or not hasattr(net, "no_sync")
                with (contextlib.nullcontext() if sync else net.no_sync()):
                    with amp():
                        loss = lm_loss(net, x, pos) / st.grad_accum
                    loss.backward()
                step_loss += loss.detach()
            if cfg.optim.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

            tokens_before = state.tokens
            state.step, state.stage_step, state.tokens = state.step + 1, state.stage_step + 1, \
                state.tokens + plan.tokens_per_step
            win_tokens, win_steps = win_tokens + plan.tokens_per_step, win_steps + 1
            win_loss += float(step_loss)
            now = time.perf_counter()
            state.elapsed_s = elapsed0 + now - t_start
            state.stage_wall_s[st.index] = stage_wall0 + now - stage_t0
            stage_done = state.stage_step >= st.steps
            if plan.time_mode:  # every rank must switch at the same step: agree on the clock of the slowest
                late = torch.tensor([float(state.elapsed_s >= time_end)], device=device)
                stage_done = stage_done or bool(io.all_reduce_sum(late) > 0)
            run_done = stage_done and st.index == len(plan.stages) - 1
            due_ckpt = stage_done or _crossed(tokens_before, state.tokens, cfg.train.checkpoint_every_tokens)
            due_eval = run_done or _crossed(tokens_before, state.tokens, cfg.train.eval_every_tokens)
            due_log = state.step % cfg.train.log_every_steps == 0 or stage_done or due_eval or due_ckpt
            if not due_log:
                continue
            loss_avg = io.all_reduce_sum(torch.tensor([win_loss / win_steps], device=device))
            metrics = {
                "step": state.step, "stage": st.index, "seq_len": st.seq_len, "tokens": state.tokens,
                "loss": float(loss_avg) / io.world_size, "lr": lr,
                "tokens_per_s": win_tokens / max(1e-9, now - win_t0),
                "data_wait_frac": win_wait / max(1e-9, now - win_t0), "elapsed_s": state.elapsed_s,
                "total_tokens": plan.total_tokens, "num_stages": len(plan.stages),
            }
            if plan.time_mode:
                metrics["budget_time_s"] = plan.budget_time_s
            if due_eval:
                metrics["val_loss"] = evaluator.loss(model, st.seq_len, io, device, amp)
                metrics["val_loss_final_len"] = evaluator.loss(model, plan.final_len, io, device, amp)
                final_val = metrics
            if stage_done:
                state.stage, state.stage_step = st.index + 1, 0
            io.report(metrics, checkpoint=(model, optimizer, state) if due_ckpt else None)
            # the next window starts now, so the time spent in eval, checkpoint and report counts against it
            win_t0, win_tokens, win_wait, win_loss, win_steps = now, 0, 0.0, 0.0, 0
            if stage_done:
                break
        if plan.time_mode and state.elapsed_s >= plan.budget_time_s:
            break
    if on_finish is not None:
        on_finish(model, state, final_val)
    return state


def local_io(cfg: Config, plan: Plan, train: TokenStream, run_uri: str, report: Callable[[dict], None]) -> WorkerIO:
    """A WorkerIO for one process without Ray: batches straight from the token stream, checkpoints written to
    RUN/checkpoint_step-NNNNNNN/ and pruned to train.keep_checkpoints."""
    from gl_ray import storage
    from gl_ray.data.stream import stage_batches
    from gl_ray.train.checkpoint import checkpoint_name, prune_checkpoints, restore_latest, save_checkpoint

    def do_report(metrics: dict, checkpoint=None) -> None:
        if checkpoint is not None:
            model, optimizer, state = checkpoint
            save_checkpoint(storage.join(run_uri, checkpoint_name(state.step)), model, optimizer, state)
            prune_checkpoints(run_uri, cfg.train.keep_checkpoints)
        report(metrics)

    return WorkerIO(rank=0, world_size=1, batches=lambda k, s: stage_batches(train, plan, k, 0, s),
                    report=do_report, restore=lambda m, o: restore_latest(run_uri, m, o))
