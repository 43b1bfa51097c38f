"""GrowLength stage planner and learning-rate schedule: pure functions of plain values (no Ray, no torch).

Units: `tokens` are token counts, `steps` are optimizer steps, `seqs` are sequences (rows of `seq_len`
tokens). Every stage keeps the same `tokens_per_step`, so a stage of length L runs tokens_per_step / L
sequences per optimizer step, split over the workers and, within a worker, over gradient-accumulation micro
batches of at most `micro_batch_tokens` tokens.

Stage lengths come from `schedule.shape` (`stage_lengths`): a ladder of explicit lengths (GrowLength), or a
linear or geometric warmup generated from start_len to final_len. `schedule.mode` says what a stage length
means: reshape, rows of that length; window, rows at the final length with attention limited to a causal
window of that length (SkyLadder-style; the last stage has full attention).

Token budget: optimizer steps are shared out by the ratios (largest remainder, every stage at least one
step); a budget that is not a whole number of steps leaves `unplanned_tokens` (< one step) untrained, and the
plan says so. Time budget: stage k runs until elapsed wall time reaches the cumulative share of
`budget_time_s`; its data slice is its share of a token cap (`budget_tokens`, else the corpus size).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import NamedTuple

from gl_ray.errors import UserError


@dataclass(frozen=True, kw_only=True)
class Stage:
    index: int
    seq_len: int
    sequences_per_step: int  # global, all workers together
    micro_batch: int  # sequences per forward pass per worker
    grad_accum: int  # micro batches per optimizer step per worker
    steps: int  # optimizer steps (an upper bound in time mode)
    tokens: int  # steps * tokens_per_step
    start_step: int  # optimizer steps before this stage
    start_token: int  # tokens before this stage (offset of its slice in the train stream)
    time_s: float  # wall-time share in time mode, else 0
    window: int = 0  # attention window in tokens (schedule.mode window), 0: plain causal attention
    rope_theta: float = 0.0  # RoPE base of this stage (schedule.rope_theta), 0: the model's own

    @property
    def rows_per_rank_step(self) -> int:
        """Sequences one worker takes per optimizer step (micro_batch * grad_accum)."""
        return self.micro_batch * self.grad_accum

    @property
    def end_step(self) -> int:
        """Global optimizer steps done when this stage ends."""
        return self.start_step + self.steps


@dataclass(frozen=True, kw_only=True)
class Plan:
    stages: tuple[Stage, ...]
    tokens_per_step: int
    world_size: int
    total_tokens: int
    total_steps: int
    budget_tokens: int
    budget_time_s: float
    unplanned_tokens: int  # budget tokens that do not fill a whole optimizer step: not trained
    auto_micro_batch: bool = False  # train.micro_batch_tokens: auto: stage micro batches are upper bounds

    @property
    def time_mode(self) -> bool:
        return self.budget_time_s > 0

    @property
    def final_len(self) -> int:
        return self.stages[-1].seq_len

    @property
    def window_mode(self) -> bool:
        return any(s.window for s in self.stages)

    def stage_at_step(self, step: int) -> Stage:
        """The stage that optimizer step `step` (0-based, global) belongs to."""
        for st in self.stages:
            if step < st.end_step:
                return st
        raise ValueError(f"step {step} is past the plan ({self.total_steps} steps)")

    def time_end_s(self, stage: int) -> float:
        """Elapsed wall time (time mode) at which stage `stage` ends: the cumulative share of the budget."""
        return sum(s.time_s for s in self.stages[: stage + 1])

    def to_dict(self) -> dict:
        """Every field, for shipping the plan to workers; `Plan.from_dict` gives it back."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Plan:
        return cls(**(d | {"stages": tuple(Stage(**s) for s in d["stages"])}))

    def to_json(self) -> dict:
        """The summary written to RUN/plan.json and printed by `gl-ray plan --json`."""
        keys = ("index", "seq_len", "sequences_per_step", "micro_batch", "grad_accum", "steps", "tokens")
        windowed = self.window_mode
        out = {
            "stages": [{k: asdict(s)[k] for k in keys} | ({"time_s": s.time_s} if self.time_mode else {})
                       | ({"window": s.window} if windowed else {})
                       | ({"rope_theta": s.rope_theta} if s.rope_theta else {}) for s in self.stages],
            "total_tokens": self.total_tokens,
            "total_steps": self.total_steps,
            "tokens_per_step": self.tokens_per_step,
            "world_size": self.world_size,
            "unplanned_tokens": self.unplanned_tokens,
            "auto_micro_batch": self.auto_micro_batch,
        }
        if self.time_mode:
            out["budget_time_s"] = self.budget_time_s
        return out


def normalise_ratios(lengths: list[int], ratios: list[float]) -> list[float]:
    """Ratios as given (checked), or equal shares when empty."""
    if not ratios:
        return [1.0 / len(lengths)] * len(lengths)
    if len(ratios) != len(lengths):
        raise UserError(f"schedule.ratios has {len(ratios)} entries but schedule.lengths has {len(lengths)}")
    for i, r in enumerate(ratios):
        if not isinstance(r, (int, float)) or isinstance(r, bool) or not r > 0:
            raise UserError(f"schedule.ratios[{i}]={r!r} must be a positive number")
    if abs(sum(ratios) - 1.0) > 1e-6:
        raise UserError(f"schedule.ratios {ratios} sum to {sum(ratios):.6g}, not 1")
    return [float(r) for r in ratios]


def check_lengths(lengths: list[int]) -> None:
    if not lengths:
        raise UserError("schedule.lengths is empty; give at least one length, e.g. [1024]")
    for i, L in enumerate(lengths):
        if not isinstance(L, int) or isinstance(L, bool) or L <= 0 or L % 8:
            raise UserError(f"schedule.lengths[{i}]={L!r} must be a positive multiple of 8")
    for a, b in zip(lengths, lengths[1:]):
        if b <= a:
            raise UserError(f"schedule.lengths {lengths} must be strictly increasing ({a} then {b})")


def _check_generated(lengths: list[int], what: str) -> None:
    for L in lengths:
        if L % 8:
            raise UserError(f"{what} generates a stage of length {L}, not a multiple of 8; choose lengths whose "
                            "stages all are")


MAX_STAGES = 1024  # a generated schedule longer than this is a typo (and would be built in memory first)


def _stages_by_step(shape: str, a: int, b: int, step: float) -> float:
    """How many stages len_step (linear) or growth (geometric) makes from a to b, counted before they are made."""
    if shape == "linear":
        return (b - a) / step + 1 if step > 0 else 0
    return math.log(b / a) / math.log(step) + 1 if step > 1 else 0


def _check_stage_count(count: float, shape: str) -> None:
    if count > MAX_STAGES:
        raise UserError(f"shape {shape}: the schedule would have {count:,.0f} stages, more than {MAX_STAGES}; "
                        "use a larger len_step or growth, or fewer num_stages")


def stage_lengths(s) -> tuple[list[int], list[float]]:
    """(lengths, ratios) of a ScheduleConfig. ladder: its lengths and ratios. linear: start_len, + len_step, ...,
    final_len; geometric: start_len, * growth, ..., final_len (or num_stages evenly spaced / spaced by a constant
    factor, rounded to multiples of 8); start_len and final_len default to the ladder's first and last length.
    The keys of the other shapes may stay set (one config switches shape with one key, as a Tune space does).
    ratios: as given, else warmup_fraction split equally over the stages before the final one and the rest at
    final_len, else equal shares."""
    if not s.lengths and (s.shape == "ladder" or not (s.start_len and s.final_len)):
        raise UserError(f"schedule.lengths is empty: give at least one length (shape {s.shape}"
                        + (")" if s.shape == "ladder" else ", or both start_len and final_len)"))
    if s.shape == "ladder":
        lengths = list(s.lengths)
    else:
        a, b, n = s.start_len or s.lengths[0], s.final_len or s.lengths[-1], s.num_stages
        if not (isinstance(a, int) and isinstance(b, int)) or a <= 0 or a % 8 or b % 8 or b <= a:
            raise UserError(f"shape {s.shape}: schedule.start_len={a} and final_len={b} must be multiples of 8 "
                            "with start_len < final_len")
        step = s.len_step if s.shape == "linear" else s.growth
        name = "len_step" if s.shape == "linear" else "growth"
        if bool(n) == bool(step):
            raise UserError(f"shape {s.shape}: give exactly one of schedule.{name} and schedule.num_stages")
        if n < 0:
            raise UserError(f"schedule.num_stages={n} must be positive")
        _check_stage_count(n or _stages_by_step(s.shape, a, b, step), s.shape)
        if s.shape == "linear":
            if n:
                lengths = [round((a + (b - a) * k / n) / 8) * 8 for k in range(n)] + [b]
            else:
                if step <= 0 or (b - a) % step:
                    raise UserError(f"shape linear: final_len {b} is not reachable from start_len {a} in steps of "
                                    f"len_step={step}; (final_len - start_len) must be a positive multiple of it")
                lengths = list(range(a, b + 1, step))
        else:
            if n:
                lengths = [round(a * (b / a) ** (k / n) / 8) * 8 for k in range(n)] + [b]
            else:
                if step <= 1:
                    raise UserError(f"shape geometric: schedule.growth={step} must be greater than 1")
                k = round(math.log(b / a, step))
                if k < 1 or abs(a * step ** k - b) > 1e-6 * b:
                    raise UserError(f"shape geometric: final_len {b} is not reachable from start_len {a} by "
                                    f"factors of growth={step:g}")
                lengths = [round(a * step ** i) for i in range(k)] + [b]
        _check_generated(lengths, f"shape {s.shape}")
        if len(set(lengths)) != len(lengths):
            raise UserError(f"shape {s.shape}: {s.num_stages} stages between {a} and {b} give repeated lengths "
                            f"{lengths}; use fewer stages")
    ratios = list(s.ratios)
    if s.warmup_fraction:
        if ratios:
            raise UserError("give either schedule.ratios or schedule.warmup_fraction, not both")
        if not 0 < s.warmup_fraction < 1 or len(lengths) < 2:
            raise UserError(f"schedule.warmup_fraction={s.warmup_fraction} must be in (0, 1) and the schedule "
                            "needs at least two lengths")
        w = len(lengths) - 1
        ratios = [s.warmup_fraction / w] * w + [1.0 - s.warmup_fraction]
    return lengths, ratios


def split_steps(total_steps: int, ratios: list[float]) -> list[int]:
    """Whole optimizer steps per stage in proportion to ratios (largest remainder; ties go to later stages)."""
    ideal = [r * total_steps for r in ratios]
    steps = [math.floor(x + 1e-9) for x in ideal]
    order = sorted(range(len(ratios)), key=lambda i: (ideal[i] - steps[i], i), reverse=True)
    for i in order[: total_steps - sum(steps)]:
        steps[i] += 1
    return steps


def divisors(n: int) -> list[int]:
    """The divisors of n >= 1, ascending, in O(sqrt n) (n may be 2**40 / seq_len)."""
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return small + [n // d for d in reversed(small) if n // d != d]


def micro_batch_for(seqs_per_worker: int, seq_len: int, micro_batch_tokens: int) -> int:
    """Largest divisor of seqs_per_worker whose tokens fit micro_batch_tokens (so grad_accum is whole)."""
    limit = micro_batch_tokens // seq_len
    return max(d for d in divisors(seqs_per_worker) if d <= limit)


class _Shape(NamedTuple):
    """One stage's batch shape, before steps are shared out."""
    seq_len: int
    seqs: int  # sequences per optimizer step, all workers together
    micro_batch: int  # sequences per forward pass per worker
    grad_accum: int  # micro batches per optimizer step per worker


def plan_stages(
    *,
    lengths: list[int],
    ratios: list[float],
    tokens_per_step: int,
    micro_batch_tokens: int | str,
    num_workers: int,
    budget_tokens: int = 0,
    budget_time_s: float = 0.0,
    cap_tokens: int = 0,
    mode: str = "reshape",
) -> Plan:
    """The stage plan. `num_workers=0` means one process without Ray (world size 1). micro_batch_tokens "auto":
    each worker picks the micro batch at the start of each stage (gl_ray.train.micro_batch); the plan's micro
    batch is then the upper bound, all of a worker's sequences of a step.

    In time mode (`budget_time_s > 0`) step counts are upper bounds sized from `budget_tokens`, else from
    `cap_tokens` (the corpus size, when the caller knows it), else they are 0 (unknown until the run).
    mode window: every stage's rows are lengths[-1] long and stage k attends within a window of lengths[k].
    """
    check_lengths(lengths)
    lengths, windows = _rows_and_windows(lengths, mode)
    ratios = normalise_ratios(lengths, ratios)
    _check_budget(budget_tokens, budget_time_s)
    world = max(1, num_workers)
    auto = micro_batch_tokens == "auto"
    shapes = _stage_shapes(lengths, tokens_per_step=tokens_per_step, world=world,
                           micro_batch_tokens=tokens_per_step if auto else micro_batch_tokens)
    steps = _stage_steps(ratios, tokens_per_step=tokens_per_step, budget_tokens=budget_tokens,
                         budget_time_s=budget_time_s, cap_tokens=cap_tokens)
    stages = _lay_out(shapes, steps, ratios=ratios, windows=windows, tokens_per_step=tokens_per_step,
                      budget_time_s=budget_time_s)
    total_steps = sum(steps)
    total_tokens = total_steps * tokens_per_step
    time_mode = budget_time_s > 0
    return Plan(stages=stages, tokens_per_step=tokens_per_step, world_size=world, total_tokens=total_tokens,
                total_steps=total_steps, budget_tokens=budget_tokens, budget_time_s=budget_time_s,
                unplanned_tokens=(budget_tokens - total_tokens) if budget_tokens and not time_mode else 0,
                auto_micro_batch=auto)


def _rows_and_windows(lengths: list[int], mode: str) -> tuple[list[int], list[int]]:
    """(row length, attention window) per stage. reshape: rows of each length, no window. window: rows at the
    final length, stage k attends within lengths[k], the last stage fully (window 0)."""
    if mode == "window":
        return [lengths[-1]] * len(lengths), lengths[:-1] + [0]
    return lengths, [0] * len(lengths)


def _check_budget(budget_tokens: int, budget_time_s: float) -> None:
    if budget_tokens < 0 or budget_time_s < 0:
        raise UserError("schedule.budget_tokens and schedule.budget_time_s must be >= 0")
    if budget_tokens == 0 and budget_time_s == 0:
        raise UserError("set a budget: schedule.budget_tokens or schedule.budget_time_s")


def _stage_shapes(lengths: list[int], *, tokens_per_step: int, world: int, micro_batch_tokens: int) -> list[_Shape]:
    """Sequences per step, micro batch and accumulation of every stage; a UserError names the first stage whose
    length does not fit the step, the workers or the micro batch."""
    shapes = []
    for k, L in enumerate(lengths):
        if tokens_per_step % L:
            raise UserError(f"stage {k}: schedule.tokens_per_step={tokens_per_step} is not divisible by "
                            f"seq_len {L}; every stage length divides a multiple of {math.lcm(*lengths)}")
        seqs = tokens_per_step // L
        if seqs % world:
            raise UserError(f"stage {k}: {seqs} sequences per step (seq_len {L}) do not split evenly over "
                            f"{world} workers; change schedule.tokens_per_step or ray.num_workers")
        if micro_batch_tokens < L:
            raise UserError(f"stage {k}: train.micro_batch_tokens={micro_batch_tokens} is smaller than one "
                            f"sequence of {L} tokens")
        mb = micro_batch_for(seqs // world, L, micro_batch_tokens)
        shapes.append(_Shape(seq_len=L, seqs=seqs, micro_batch=mb, grad_accum=seqs // world // mb))
    return shapes


def _stage_steps(ratios: list[float], *, tokens_per_step: int, budget_tokens: int, budget_time_s: float,
                 cap_tokens: int) -> list[int]:
    """Optimizer steps per stage. Token mode: the budget's whole steps shared by the ratios, every stage at least
    one. Time mode: upper bounds from budget_tokens, else cap_tokens, else all 0 (unknown until the run)."""
    time_mode = budget_time_s > 0
    token_budget = budget_tokens if budget_tokens > 0 else (cap_tokens if time_mode else 0)
    total_steps = token_budget // tokens_per_step
    if not time_mode and total_steps < len(ratios):
        raise UserError(f"schedule.budget_tokens={budget_tokens} is smaller than one optimizer step "
                        f"({tokens_per_step} tokens) per stage for {len(ratios)} stages")
    steps = split_steps(total_steps, ratios) if total_steps else [0] * len(ratios)
    if not time_mode and min(steps) == 0:
        k = steps.index(0)
        raise UserError(f"stage {k} gets no optimizer step: schedule.ratios[{k}]={ratios[k]} of "
                        f"{total_steps} steps; raise the budget or that ratio")
    return steps


def _lay_out(shapes: list[_Shape], steps: list[int], *, ratios: list[float], windows: list[int],
             tokens_per_step: int, budget_time_s: float) -> tuple[Stage, ...]:
    """The stages end to end: each starts (in steps and tokens) where the one before it ends."""
    stages, step0 = [], 0
    for k, (shape, n) in enumerate(zip(shapes, steps)):
        stages.append(Stage(index=k, seq_len=shape.seq_len, sequences_per_step=shape.seqs,
                            micro_batch=shape.micro_batch, grad_accum=shape.grad_accum, steps=n,
                            tokens=n * tokens_per_step, start_step=step0, start_token=step0 * tokens_per_step,
                            time_s=ratios[k] * budget_time_s, window=windows[k]))
        step0 += n
    return tuple(stages)


def make_plan(cfg, cap_tokens: int = 0, workers: int | None = None) -> Plan:
    """The plan of a Config (see gl_ray.config) for ray.num_workers, or `workers`. The driver builds it once (with
    the corpus size as `cap_tokens`) and ships it to the workers as `Plan.to_dict()`."""
    s = cfg.schedule
    lengths, ratios = stage_lengths(s)
    if lengths[-1] > cfg.model.max_position_embeddings:
        raise UserError(
            f"last stage length {lengths[-1]} exceeds model.max_position_embeddings="
            f"{cfg.model.max_position_embeddings}; raise it or shorten the schedule")
    plan = plan_stages(lengths=lengths, ratios=ratios, tokens_per_step=s.tokens_per_step,
                       micro_batch_tokens=cfg.train.micro_batch_tokens,
                       num_workers=cfg.ray.num_workers if workers is None else workers,
                       budget_tokens=s.budget_tokens, budget_time_s=s.budget_time_s, cap_tokens=cap_tokens,
                       mode=s.mode)
    return with_rope_thetas(plan, s.rope_theta)


def with_rope_thetas(plan: Plan, thetas: list[float]) -> Plan:
    """The plan with schedule.rope_theta's base on each stage (empty: unchanged); UserError unless there is one
    positive base per stage."""
    if not thetas:
        return plan
    if len(thetas) != len(plan.stages):
        raise UserError(f"schedule.rope_theta has {len(thetas)} values for {len(plan.stages)} stages "
                        f"({', '.join(str(st.seq_len) for st in plan.stages)}): give one RoPE base per stage")
    if any(not t > 0 for t in thetas):
        raise UserError(f"schedule.rope_theta values must be positive, got {thetas}")
    return replace(plan, stages=tuple(replace(st, rope_theta=float(t)) for st, t in zip(plan.stages, thetas)))


def plans_by_world(cfg, cap_tokens: int = 0) -> dict[int, Plan]:
    """Elastic training (ray.num_workers: [min, max]): the plan of each world size the run may train with. They
    differ only in how a step's sequences are shared out (micro batch, accumulation); steps, tokens per step and
    the rows of each step are the same, so a run that shrinks or grows trains on exactly the same data."""
    plans = {}
    for w in cfg.ray.world_sizes:
        try:
            plans[w] = make_plan(cfg, cap_tokens, workers=w)
        except UserError as e:
            raise UserError(f"ray.num_workers [{cfg.ray.world_sizes[0]}, {cfg.ray.num_workers}]: {e}") from None
    return plans


def lr_at(tokens_seen: int, lr: float, min_lr: float, warmup_tokens: int, total_tokens: int,
          time_frac: float | None = None) -> float:
    """Learning rate after `tokens_seen` tokens: linear warmup, then cosine from lr to min_lr.

    The cosine runs over tokens after warmup up to `total_tokens`, or, in time mode, over `time_frac`
    (elapsed / budget_time_s). A function of tokens (or time) alone, so it is continuous across stage
    switches whatever their lengths.
    """
    warm = min(1.0, tokens_seen / warmup_tokens) if warmup_tokens > 0 else 1.0
    if time_frac is None:
        span = max(1, total_tokens - warmup_tokens)
        frac = (tokens_seen - warmup_tokens) / span
    else:
        frac = time_frac
    frac = min(1.0, max(0.0, frac))
    return warm * (min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * frac)))


def format_plan(plan: Plan) -> str:
    """A human table of the plan."""
    head = f"{'stage':>5} {'seq_len':>7} {'seqs/step':>9} {'micro':>5} {'accum':>5} {'steps':>7} {'tokens':>13}"
    if plan.window_mode:
        head += f" {'window':>7}"
    if plan.time_mode:
        head += f" {'time_s':>8}"
    thetas = any(s.rope_theta for s in plan.stages)
    if thetas:
        head += f" {'rope_theta':>10}"
    rows = [head]
    for s in plan.stages:
        row = (f"{s.index:>5} {s.seq_len:>7} {s.sequences_per_step:>9} {s.micro_batch:>5} {s.grad_accum:>5} "
               f"{s.steps:>7} {s.tokens:>13,}")
        if plan.window_mode:
            row += f" {s.window or 'full':>7}"
        if plan.time_mode:
            row += f" {s.time_s:>8.1f}"
        if thetas:
            row += f" {s.rope_theta:>10g}"
        rows.append(row)
    rows.append(f"total: {plan.total_steps} steps, {plan.total_tokens:,} tokens, "
                f"{plan.tokens_per_step:,} tokens/step, world size {plan.world_size}")
    if plan.window_mode:
        rows.append(f"window mode: every row is {plan.final_len} tokens; attention reaches back `window` tokens")
    if plan.auto_micro_batch:
        rows.append("micro batch: auto, chosen by each worker at each stage start (micro/accum above: the most "
                    "it may be)")
    if plan.unplanned_tokens:
        rows.append(f"remainder: {plan.unplanned_tokens:,} budget tokens (less than one step) are not trained")
    if plan.time_mode:
        rows.append(f"time budget {plan.budget_time_s:g} s: stages switch at their time share; step counts "
                    "are caps from the token budget or corpus size")
    return "\n".join(rows)
