"""The paper's comparison in one call: GrowLength vs fixed-shortest (LLM128) vs fixed-longest (LLM1024) on the same
data and budget, then `report` and `eval`; optionally a ratio ablation (the paper's Figure 5).

Runs go one after another into OUT/runs/; the comparison into OUT/eval.json (+ eval.png and eval_*.png: the
context-use metrics) and OUT/report/ (with the eval's headline numbers and, with --seeds 2+, Welch's t-tests). With
data.sources (a mixture) OUT/eval_sources.json holds the loss on each source's val split too.

    gl-ray reproduce --config pipelines/configs/tiny-growlength.yaml --data data/stdlib --budget-time-s 90 \
        --out results/tiny [--ratios "0.25,0.25,0.25,0.25;0.4,0.3,0.2,0.1"] [--modes reshape,window,decompose]

`--modes reshape,window` adds, for every GrowLength arm, the same schedule in window mode (rows at the final
length, attention growing through the stage lengths: SkyLadder-style), named ...-window; `decompose` the same
ladder over dataset-decomposition buckets (data.packing=decompose, curriculum ladder), named ...-decompose.
"""

from __future__ import annotations

import json
from pathlib import Path

from gl_ray import storage
from gl_ray.config import load_config
from gl_ray.data.mixture import source_names
from gl_ray.errors import UserError
from gl_ray.evaluate import DEFAULT_CONTEXT, NO_CONTEXT, ContextSettings, evaluate_models, format_eval
from gl_ray.plots import plot_context, plot_eval
from gl_ray.report import build_report, format_report
from gl_ray.schedule import normalise_ratios, stage_lengths
from gl_ray.train.driver import launch_run
from gl_ray.train.preflight import preflight

MODES = ("reshape", "window", "decompose")


def parse_ratio_sets(text: str, stages: int) -> list[list[float]]:
    """'0.25,0.25,0.25,0.25;0.1,0.2,0.3,0.4' -> checked lists (each sums to 1, one entry per stage)."""
    sets = []
    for part in [p for p in text.split(";") if p.strip()]:
        try:
            r = [float(x) for x in part.split(",")]
        except ValueError:
            raise UserError(f"--ratios {part!r}: expected comma-separated numbers") from None
        sets.append(normalise_ratios([0] * stages, r))
    return sets


def parse_modes(text: str) -> list[str]:
    modes = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes or len(set(modes)) != len(modes):
        raise UserError(f"--modes {text!r}: expected a comma-separated subset of {','.join(MODES)}")
    return modes


def run_variants(base_config: str, overrides: list[str], ratio_sets: list[list[float]], seeds: int = 1,
                 modes: tuple[str, ...] = ("reshape",)) -> list[list[str]]:
    """Override lists of every run: GrowLength (one per ratio set, and per mode), fixed shortest, fixed longest
    (a fixed length has no mode; with data.stage_weights or data.long_doc_boost it draws its stage's mix); with
    seeds > 1,
    each of them `seeds` times, named ...-s0, -s1, ... with train.seed (weight init, PoSE draws) and data.seed
    (document order) both set to the base config's plus k."""
    cfg = load_config(base_config, overrides)
    (lengths, default_ratios), prefix = stage_lengths(cfg.schedule), cfg.name
    if len(lengths) < 2:
        raise UserError(f"{base_config}: reproduce needs a GrowLength config with at least two lengths")
    if seeds < 1:
        raise UserError(f"--seeds {seeds} must be at least 1")
    arms = []  # (name, overrides of the arm)
    for i, ratios in enumerate(ratio_sets or [default_ratios]):
        tag = "growlength" if not ratio_sets or len(ratio_sets) == 1 else f"growlength-r{i}"
        for mode in modes:
            packing = "decompose" if mode == "decompose" else "concat"
            sets = [f"schedule.ratios={ratios}", "schedule.warmup_fraction=0",
                    f"schedule.mode={'window' if mode == 'window' else 'reshape'}", f"data.packing={packing}"]
            arms.append((f"{prefix}-{tag}" + (f"-{mode}" if mode != "reshape" else ""), sets))
    fixed = ["schedule.shape=ladder", "schedule.ratios=[1.0]", "schedule.warmup_fraction=0", "schedule.mode=reshape",
             "data.packing=concat"]
    for k in (0, len(lengths) - 1):  # a fixed arm draws the mix of the stage whose length it trains at
        mix = [f"data.stage_weights=[{cfg.data.stage_weights[k]}]"] if cfg.data.stage_weights else []
        mix += [f"data.long_doc_boost=[{cfg.data.long_doc_boost[k]}]"] if cfg.data.long_doc_boost else []
        if cfg.data.long_doc_boost and not cfg.data.long_doc_min:
            mix.append(f"data.long_doc_min={lengths[-1]}")  # long: as in the ladder, not from the fixed length
        arms.append((f"{prefix}-fixed{lengths[k]}", [f"schedule.lengths=[{lengths[k]}]", *fixed, *mix]))
    if seeds == 1:
        return [[*overrides, f"name={name}", *sets] for name, sets in arms]
    return [[*overrides, f"name={name}-s{k}", *sets, f"train.seed={cfg.train.seed + k}",
             f"data.seed={cfg.data.seed + k}"] for name, sets in arms for k in range(seeds)]


def reproduce(*, base_config: str, data: str, out: str, budget_tokens: int = 0, budget_time_s: float = 0.0,
              ratios: str = "", seeds: int = 1, modes: str = "reshape", workers: int | None = None,
              eval_lengths: list[int] | None = None,
              eval_tokens: int = 0, eval_context: ContextSettings = DEFAULT_CONTEXT, extra: list[str] | None = None,
              address: str | None = None) -> dict:
    """Train every arm (and seed) one after another, then eval (loss and the `eval_context` metrics) and report.
    eval_tokens: val tokens per length in the context-extension eval (0: 64 windows of the longest eval length)."""
    if not budget_tokens and not budget_time_s:
        raise UserError("give a budget: --budget-tokens or --budget-time-s (the same for every run)")
    runs_dir = str(Path(out, "runs").resolve())
    overrides = [*(extra or []), f"data.path={data}", f"ray.storage_path={runs_dir}",
                 f"schedule.budget_tokens={budget_tokens}", f"schedule.budget_time_s={budget_time_s}"]
    if workers is not None:
        overrides.append(f"ray.num_workers={workers}")
    stages = len(stage_lengths(load_config(base_config, overrides).schedule)[0])
    variants = run_variants(base_config, overrides, parse_ratio_sets(ratios, stages) if ratios else [], seeds,
                            tuple(parse_modes(modes)))
    configs = [load_config(base_config, v) for v in variants]
    for cfg in configs:  # every run checked before the first starts
        preflight(cfg)
    spans = [stage_lengths(c.schedule)[0] for c in configs]
    longest = max(max(s) for s in spans)
    eval_lens = eval_lengths or sorted({min(s) for s in spans} | {longest // 2, longest, 2 * longest, 4 * longest})
    eval_context.check(eval_lens)  # a bad eval setting fails now, not after the training
    names = []
    for k, cfg in enumerate(configs):
        lengths, ratios = stage_lengths(cfg.schedule)
        print(f"[reproduce] training {k + 1}/{len(configs)}: {cfg.name} ({cfg.schedule.mode}, lengths {lengths}, "
              f"ratios {[round(r, 4) for r in ratios]})", flush=True)
        launch_run(cfg, address=address)
        names.append(cfg.name)
    run_uris = [str(Path(runs_dir, n)) for n in names]
    finals, max_tokens = [f"{u}/final" for u in run_uris], eval_tokens or max(eval_lens) * 64
    ev = evaluate_models(finals, configs[0].data.path, eval_lens, max_tokens=max_tokens,
                         document_masking=configs[0].data.document_masking, context=eval_context)
    Path(out, "eval.json").write_text(json.dumps(ev, indent=1))
    plot_eval(ev, str(Path(out, "eval.png")))
    plot_context(ev, str(Path(out, "eval")))
    print(format_eval(ev))
    if configs[0].data.sources:  # a mixture: each source's val split as well (loss only)
        by_source = eval_sources(configs[0].data, finals, eval_lens, max_tokens=max_tokens, known=ev)
        Path(out, "eval_sources.json").write_text(json.dumps(by_source, indent=1))
        for name, res in by_source.items():
            print(f"\nval split of source {name!r}:\n{format_eval(res)}")
    rep = build_report(run_uris, str(Path(out, "report")), eval_res=ev)
    print(format_report(rep))
    return {"runs": run_uris, "report": rep, "eval": ev}


def eval_sources(data, models: list[str], lengths: list[int], *, max_tokens: int, known: dict | None = None) -> dict:
    """Loss and perplexity of each model at each length on the val split of each of data.sources: {source name:
    an `evaluate_models` result} (the names of plan.json's sources). known: a result of the same models, lengths
    and max_tokens on one of those splits (data.path's), reused without its context metrics instead of run again."""
    paths = [s.path for s in data.sources]
    done = {storage.absolute(known["data"]): {k: v for k, v in known.items() if k != "context"}} if known else {}
    return {name: done.get(storage.absolute(path)) or evaluate_models(
                models, path, lengths, max_tokens=max_tokens, document_masking=data.document_masking,
                context=NO_CONTEXT)
            for name, path in zip(source_names(paths), paths)}
