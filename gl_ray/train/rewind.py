"""Resume a run from an earlier checkpoint of its own: `gl-ray train ... --rewind-to STEP [--skip-steps N]`.

After a divergence (the loss-spike rule or the non-finite guard stopped the run, exit 3) the newest checkpoint may
already hold a model on its way up; large runs then go back to a healthy checkpoint, often skipping the batches
that came right after it. Under the run's lock, before training:
- the checkpoints after STEP, Ray Train's checkpoint list, a finished run's final/ and summary.json, and a copy of
  metrics.jsonl are moved (never deleted) into RUN/rewound/<time>/, so the resume finds STEP as the newest
  checkpoint and drops the metric lines after it;
- with --skip-steps N, RUN/rewind.json says so: a worker that restores the checkpoint of STEP moves its data
  cursor N steps on (the same on every rank, and again after a restart before the next checkpoint), so those
  steps' rows are never trained on. Steps, tokens and the LR schedule go on as if they had been trained (as large
  runs do), and summary.json counts them apart (`tokens_skipped`). The record is sealed with a digest as
  state.json is (gl_ray.train.checkpoint.seal), and its skip is checked as --skip-steps is (`check_skip`) at
  every start and where it is applied: a torn, hand-edited or out-of-range record is one line naming the file;
- config_history.jsonl gets one line recording it.
"""

from __future__ import annotations

from gl_ray import storage
from gl_ray.errors import UserError
from gl_ray.schedule import Plan
from gl_ray.train.checkpoint import (
    TrainState,
    checkpoint_name,
    checkpoint_state,
    list_checkpoints,
    seal,
    set_aside_folder,
    unseal,
    verify_checkpoint,
)
from gl_ray.train.identity import append_history

REWIND_FILE = "rewind.json"
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's list of the run's checkpoints
REWIND_HINT = ("resume from an earlier checkpoint of this run with the same command and --rewind-to STEP "
               "(--skip-steps N also skips the data of the N steps after it)")


def rewind(run_uri: str, plan: Plan, step: int, skip_steps: int, say=print) -> None:
    """Make the checkpoint of `step` the run's newest (see the module doc); UserError before anything is moved if
    there is none, it does not verify, or the skip is not possible."""
    found = dict(list_checkpoints(run_uri))
    if step not in found:
        have = ", ".join(str(s) for s in sorted(found)) or "none"
        raise UserError(f"--rewind-to {step}: run {run_uri!r} has no checkpoint at that step (its checkpoints: "
                        f"{have})")
    state = verify_checkpoint(found[step])
    check_skip(plan, state, skip_steps)
    aside = set_aside_folder(run_uri, f"after-step-{step}")
    later = [s for s in sorted(found) if s > step]
    log = storage.join(run_uri, "metrics.jsonl")
    if storage.exists(log):  # a copy: the resume drops its lines after `step`
        storage.write_bytes(storage.join(aside, "metrics.jsonl"), storage.read_bytes(log))
    for s in later:
        storage.move(found[s], storage.join(aside, found[s].rsplit("/", 1)[-1]))
    if storage.exists(storage.join(run_uri, RAY_SNAPSHOT)):  # it names the checkpoints just moved
        storage.move(storage.join(run_uri, RAY_SNAPSHOT), storage.join(aside, RAY_SNAPSHOT))
    for name in ("final", "summary.json"):  # the rewound run's end: a rewind stopped before its own must not look done
        if storage.exists(storage.join(run_uri, name)):
            storage.move(storage.join(run_uri, name), storage.join(aside, name))
    storage.write_bytes(storage.join(run_uri, REWIND_FILE), seal({"step": step, "skip_steps": skip_steps}))
    append_history(run_uri, {"rewind": {"to_step": step, "skip_steps": skip_steps,
                                        "set_aside": [checkpoint_name(s) for s in later], "moved_to": aside}})
    say(f"rewound to the checkpoint of step {step}" + (f", skipping the data of the {skip_steps} steps after it"
                                                       if skip_steps else "")
        + (f"; checkpoints {', '.join(str(s) for s in later)} moved to {aside}" if later else ""))


def check_skip(plan: Plan, state: TrainState, skip_steps: int) -> None:
    if skip_steps < 0:
        raise UserError(f"--skip-steps must be >= 0, got {skip_steps}")
    if not skip_steps:
        return
    if plan.time_mode:
        raise UserError("--skip-steps needs a token budget: in time mode a stage has no fixed number of steps")
    if state.stage >= len(plan.stages):
        raise UserError(f"--skip-steps {skip_steps}: the checkpoint of step {state.step} is at the end of the run")
    left = plan.stages[state.stage].steps - state.stage_step
    if skip_steps >= left:
        raise UserError(f"--skip-steps {skip_steps} reaches the end of stage {state.stage} ({left} steps left after "
                        f"step {state.step}); skip at most {left - 1}, so the stage's last step is trained")


def read_rewind_record(run_uri: str) -> tuple[int, int] | None:
    """(step, skip_steps) of RUN/rewind.json as --rewind-to wrote it; None if there is none. UserError naming it if
    it is torn or was edited (its digest)."""
    uri = storage.join(run_uri, REWIND_FILE) if run_uri else ""
    if not uri or not storage.exists(uri):
        return None
    found = unseal(storage.read_bytes(uri))
    doc, intact = found or ({}, False)
    if not intact or set(doc) != {"step", "skip_steps"} or any(type(v) is not int for v in doc.values()):
        raise UserError(f"{uri!r} is not the rewind record --rewind-to wrote (torn, or edited: its digest does not "
                        f"match); {_RECORD_FIX}")
    return doc["step"], doc["skip_steps"]


_RECORD_FIX = ("to change the skip, run the same command with --rewind-to STEP --skip-steps N (it rewrites the "
               "file); to resume with no skip, remove the file")


def _check_recorded_skip(run_uri: str, plan: Plan, state: TrainState, skip_steps: int) -> None:
    """The recorded skip from the checkpoint `state`, checked as --skip-steps is (UserError naming the file)."""
    try:
        check_skip(plan, state, skip_steps)
    except UserError as e:
        raise UserError(f"{storage.join(run_uri, REWIND_FILE)!r} asks for a skip --rewind-to would refuse "
                        f"({e}); {_RECORD_FIX}") from None


def check_rewind_record(run_uri: str, plan: Plan) -> None:
    """At a start without --rewind-to, before anything is written: RUN/rewind.json, if any, is as --rewind-to wrote
    it and, if its checkpoint is still there, its skip one --skip-steps would accept from it (UserError otherwise)."""
    found = read_rewind_record(run_uri)
    folder = dict(list_checkpoints(run_uri)).get(found[0]) if found else None
    if folder is None:  # no record, or its checkpoint is gone (pruned, set aside): the skip applies to nothing
        return
    try:
        state = checkpoint_state(folder)
    except UserError:
        return  # a resume falls back past a checkpoint that does not verify, and never applies the skip
    _check_recorded_skip(run_uri, plan, state, found[1])


def apply_skip(run_uri: str, state: TrainState, plan: Plan) -> bool:
    """A worker's restored state: if it is the checkpoint a rewind with --skip-steps went back to, move its data
    cursor on (in place), the skip checked again as --skip-steps is; returns whether it did."""
    found = read_rewind_record(run_uri)
    if found is None or state.step != found[0] or not found[1]:
        return False
    skip = found[1]
    _check_recorded_skip(run_uri, plan, state, skip)
    state.step, state.stage_step = state.step + skip, state.stage_step + skip
    state.tokens += skip * plan.tokens_per_step
    state.skipped_batch_steps += skip
    return True
