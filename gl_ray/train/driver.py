"""`gl-ray train`, the driver layer: validate everything, build the plan once, take the run's lock, check a
resume against the run's fingerprint, write RUN/config.yaml (first start) and plan.json, train (in this process,
or on Ray Train via `ray_train.fit_trainer`), print the summary. Running the same command again with the same
name resumes from the newest good checkpoint.

    summary = launch_run(load_config("pipelines/configs/tiny-growlength.yaml"))
"""

from __future__ import annotations

import json

from gl_ray import storage
from gl_ray.config import Config
from gl_ray.data.decompose import accounting, draws_for, format_buckets
from gl_ray.data.mixture import check_sources, mixture_for, plan_mixture
from gl_ray.data.stream import check_document_ends, get_stream, stage_accounting
from gl_ray.errors import UserError
from gl_ray.architectures import ModelSpec, model_line
from gl_ray.schedule import format_plan, plans_by_world
from gl_ray.train import preempt
from gl_ray.lock import run_lock
from gl_ray.train.outputs import format_summary
from gl_ray.train.identity import check_resumable, record_model, record_run, run_model
from gl_ray.train.preflight import attention_plan, preflight


def run_uri_of(cfg: Config) -> str:
    return storage.join(storage.absolute(cfg.ray.storage_path), cfg.name)


def check_memory_budget(cfg: Config, params: int) -> None:
    """train.memory_budget must at least hold the weights, gradients and AdamW state of this worker's share of the
    model's `params` parameters."""
    if cfg.train.micro_batch_tokens != "auto" or not cfg.train.memory_budget:
        return
    from gl_ray.sizes import parse_size
    from gl_ray.train.micro_batch import BYTES_PER_PARAM, too_small

    share = params // max(1, cfg.ray.num_workers) if cfg.ray.strategy == "fsdp" else params
    budget = parse_size(cfg.train.memory_budget, "train.memory_budget")
    if budget < BYTES_PER_PARAM * share:
        from gl_ray.schedule import make_plan

        raise too_small(budget, make_plan(cfg).stages[0].seq_len, share)


def launch_run(cfg: Config, *, address: str | None = None, quiet: bool = False, callbacks: list | None = None,
               verbose: bool = False, rewind_to: int | None = None, skip_steps: int = 0) -> dict:
    """Train a validated config; returns summary.json as a dict. User errors raise UserError before any Ray
    resource is claimed. `callbacks`: extra Ray Train callbacks (Tune's, for one). quiet: print nothing;
    verbose: Ray's own INFO lines too (off by default: gl-ray's lines only, and Ray's warnings and errors).
    rewind_to: resume from that earlier checkpoint of the run, skipping the data of `skip_steps` steps after it
    (gl_ray.train.rewind)."""
    say = (lambda *_: None) if quiet else print
    if skip_steps and rewind_to is None:
        raise UserError("--skip-steps goes with --rewind-to STEP (the checkpoint the skipped steps follow)")
    preflight(cfg)  # the schedule plans and this machine has what the config asks for
    if cfg.ray.num_workers:
        from gl_ray.ray_utils import check_address

        check_address(address or cfg.ray.address or None)  # a cluster that is not there: one line, now
    cfg.data.path = storage.absolute(cfg.data.path)
    if cfg.data.sources:  # each a dataset of data.path's tokenizer (paths made absolute)
        check_sources(cfg.data)
    train_stream = get_stream(cfg.data.path, "train", cfg.data.seed)  # checks manifest and every shard
    val = get_stream(cfg.data.path, "val")
    if cfg.data.document_masking:
        check_document_ends(train_stream)
        check_document_ends(val)
    plans = plans_by_world(cfg, cap_tokens=train_stream.tokens)  # one, but for an elastic run
    plan = plans[cfg.ray.num_workers]
    mixture_for(cfg.data, plan)  # data.stage_weights, long_doc_boost: one per stage, checked before anything is written
    if cfg.data.packing == "decompose":  # every step's bucket, checked before anything is written
        draws = draws_for(cfg.data, plan)
        for w in plans:
            draws.check_world(max(1, w))
    if plan.time_mode and plan.total_steps < len(plan.stages):
        raise UserError(f"time mode: the token cap ({train_stream.tokens:,} train tokens) gives fewer than one "
                        "step per stage; set schedule.budget_tokens or use more data")
    if val.tokens < plan.final_len:
        raise UserError(f"val split of {cfg.data.path!r} has {val.tokens} tokens, fewer than one row of the final "
                        f"length {plan.final_len}; prepare with a larger --val-fraction")
    run_uri = run_uri_of(cfg)
    if rewind_to is not None and not storage.exists(storage.join(run_uri, "config.yaml")):
        raise UserError(f"--rewind-to {rewind_to}: there is no run {run_uri!r} to rewind (check name and "
                        "ray.storage_path)")
    spec = run_model(run_uri, cfg, train_stream.manifest, plan.final_len)  # reads only; checked again under the lock
    check_memory_budget(cfg, spec.shape.params)
    storage.check_writable(run_uri)
    with run_lock(run_uri):  # one trainer per run, from before anything of the run is read back or written
        return _train(cfg, plans, run_uri, train_stream, spec, address=address, say=say, callbacks=callbacks,
                      quiet=quiet, verbose=verbose, rewind_to=rewind_to, skip_steps=skip_steps)


def decompose_accounting(cfg: Config, plan) -> dict:
    """plan.json's `buckets` with data.packing=decompose (gl_ray.data.decompose.accounting)."""
    return {"buckets": accounting(draws_for(cfg.data, plan), cfg.data)} if cfg.data.packing == "decompose" else {}


def _train(cfg: Config, plans: dict, run_uri: str, train_stream, spec: ModelSpec, *, address: str | None, say,
           callbacks: list | None, quiet: bool, verbose: bool, rewind_to: int | None, skip_steps: int) -> dict:
    """The locked part of launch_run: check a resume, clear leftovers, write the run files, train, summarise."""
    from gl_ray.train.checkpoint import clear_leftovers
    from gl_ray.train.rewind import check_rewind_record, rewind

    plan = plans[cfg.ray.num_workers]

    manifest_bytes = storage.read_bytes(storage.join(cfg.data.path, "manifest.json"))
    check_resumable(run_uri, cfg, plan, manifest_bytes)
    spec = run_model(run_uri, cfg, train_stream.manifest, plan.final_len)  # as the lock holder sees the run
    if rewind_to is None:  # a rewind rewrites the record
        check_rewind_record(run_uri, plan)
    for name, aside in clear_leftovers(run_uri):
        say(f"moved {name} to {aside}: left incomplete by an interrupted run" if aside else
            f"removed {name} from {run_uri}: a temp file left by an interrupted write")
    if rewind_to is not None:
        rewind(run_uri, plan, rewind_to, skip_steps, say)
    for key, (old, new) in record_run(run_uri, cfg, plan, manifest_bytes).items():
        say(f"resuming with {key} changed: {old!r} -> {new!r} (recorded in config_history.jsonl)")
    record_model(run_uri, spec)
    attention, attention_line = attention_plan(cfg, plan)
    mixture_doc, mixture_text = plan_mixture(cfg.data, plan)  # data.sources: the mix per stage, epochs per source
    plan_doc = json.dumps(plan.to_json() | {"data": stage_accounting(plan, train_stream.tokens)} | mixture_doc
                          | decompose_accounting(cfg, plan) | {"attention": attention, "model": spec.summary()},
                          indent=1)
    storage.write_bytes(storage.join(run_uri, "plan.json"), plan_doc.encode())
    say(format_plan(plan))
    say(model_line(spec, plan.stages[0].seq_len))
    if attention_line:
        say(attention_line)
    if cfg.data.packing == "decompose":
        say(format_buckets(draws_for(cfg.data, plan), cfg.data, plan.time_mode))
    if mixture_text:
        say(mixture_text)
    say(f"run folder: {run_uri}")
    preempt.clear(run_uri)
    _fit(cfg, plans, run_uri, train_stream, spec, address=address, callbacks=callbacks, quiet=quiet, verbose=verbose)
    summary_uri = storage.join(run_uri, "summary.json")
    if preempt.was_requested(run_uri) and not storage.exists(summary_uri):
        raise preempt.Preempted(preempt.stopped_message(run_uri))
    summary = storage.read_json(summary_uri)
    say(format_summary(summary))
    say(f"final model: {storage.join(run_uri, 'final')}")
    return summary


def _fit(cfg: Config, plans: dict, run_uri: str, train_stream, spec: ModelSpec, *, address: str | None,
         callbacks: list | None, quiet: bool, verbose: bool) -> None:
    """Train in this process (ray.num_workers: 0) or on Ray Train, with SIGTERM turned into a stop request (set
    after ray.init, whose own handler would exit at once)."""
    if cfg.ray.num_workers == 0:
        from gl_ray.train.io import LocalIO
        from gl_ray.train.worker import run_worker

        previous = preempt.install(run_uri)
        try:
            draws = draws_for(cfg.data, plans[0]) \
                if cfg.data.packing == "decompose" else None
            run_worker(cfg, plans[0], run_uri, LocalIO(train_stream, run_uri, cfg.train.keep_checkpoints,
                                                     async_write=cfg.train.async_checkpoint, draws=draws,
                                                     mixture=mixture_for(cfg.data, plans[0])),
                       print_progress=not quiet, spec=spec)
        finally:
            preempt.restore(previous)
        return
    from gl_ray.ray_utils import ensure_ray
    from gl_ray.train.ray_train import fit_trainer

    local_cpus = cfg.ray.local_num_cpus or int(cfg.ray.num_workers * cfg.ray.cpus_per_worker) + 2
    ensure_ray(address or cfg.ray.address or None, num_cpus=local_cpus, verbose=verbose,
               resources={k: v * cfg.ray.num_workers for k, v in cfg.ray.worker_resources.items()})
    previous = preempt.install(run_uri)
    try:
        fit_trainer(cfg, plans, run_uri, spec, callbacks=callbacks, progress=not quiet, verbose=verbose)
    finally:
        preempt.restore(previous)
