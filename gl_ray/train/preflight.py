"""What a run needs beyond its config's schema, checked before anything of the run is written: the schedule makes
a plan (lengths, ratios, budget, divisibility, positions), and this machine (or the Ray workers) has what the config
asks for: the attention kernel (the driver checks what it can know; a Ray worker checks the kernel where it
runs), a CUDA device, the trackers. Each check lives with what it checks; this module only
calls them, for the driver (`launch_run`) and for the commands that validate many runs up front (reproduce, tune).

    plan = preflight(load_config("pipelines/configs/tiny-growlength.yaml"))
"""

from __future__ import annotations

import torch

from gl_ray.architectures import spec_for
from gl_ray.attention import Route, attention_route, check_attention, check_attention_here
from gl_ray.config import Config
from gl_ray.errors import UserError
from gl_ray.data.decompose import check_lengths as check_chunk_lengths
from gl_ray.devices import check_device, pick_device
from gl_ray.schedule import Plan, make_plan, plans_by_world
from gl_ray.train.tracking import check_loggers


def trains_on_gpu(cfg: Config) -> bool:
    """Whether the training processes get a GPU: Ray workers with ray.use_gpu, or this process with a CUDA device."""
    if cfg.ray.num_workers > 0:
        return cfg.ray.use_gpu or cfg.train.device == "cuda"
    return cfg.train.device == "cuda" or (cfg.train.device == "auto" and torch.cuda.is_available())


def attention_for(cfg: Config, plan: Plan) -> Route:
    """The attention backend the run's workers use (gl_ray.attention.attention_route), as far as the driver knows
    whether they train on a GPU."""
    return attention_route(cfg.model.attention, masked=cfg.data.document_masking or plan.window_mode,
                           on_gpu=trains_on_gpu(cfg))


def attention_plan(cfg: Config, plan: Plan) -> tuple[dict, str]:
    """plan.json's `attention` ({asked, runs, why}) and the line printed with the plan ("" when the workers run
    the backend asked for)."""
    route = attention_for(cfg, plan)
    line = f"attention: {route.attention} instead of model.attention={cfg.model.attention}: {route.why}"
    return {"asked": cfg.model.attention, "runs": route.attention, "why": route.why}, line if route.why else ""


def preflight(cfg: Config) -> Plan:
    """Raise UserError on the first thing that cannot run; returns the plan without a corpus cap (the driver
    builds the real one with the corpus size)."""
    plan = make_plan(cfg)
    plans_by_world(cfg)  # elastic: every world size the run may shrink to shares a step's rows out evenly
    if cfg.data.packing == "decompose":
        check_chunk_lengths(plan.final_len, cfg.data.min_chunk)
        if cfg.data.curriculum != "ladder" and len(plan.stages) > 1:
            raise UserError(f"data.curriculum={cfg.data.curriculum} draws from every bucket in every step's odds; "
                            f"give one stage at the longest bucket (schedule.lengths=[{plan.final_len}]), or use "
                            "data.curriculum=ladder for stages")
    check_attention(cfg.model.attention, on_gpu=trains_on_gpu(cfg))
    if cfg.ray.num_workers == 0:  # Ray workers are checked where they run (ray.use_gpu reserves their GPU)
        check_device(cfg.train.device, "train.device")
        check_attention_here(attention_for(cfg, plan).attention, pick_device(cfg.train.device))
    check_loggers(cfg.train.loggers)
    if cfg.model.config and not cfg.model.init_from:  # the folder and its family (the vocab: with the data)
        spec_for(cfg.model, vocab_size=1, eos_id=0, final_len=plan.final_len)
    # model.init_from is checked by the driver (gl_ray.train.identity.run_model): a resume never reads it again
    return plan
