"""`gl-ray` command line: thin shims that parse arguments and call one library function each.

    gl-ray plan --config pipelines/configs/tiny-growlength.yaml --set schedule.lengths=[64,128]
    gl-ray prepare --source stdlib --out data/stdlib
    gl-ray train --config pipelines/configs/tiny-growlength.yaml
    gl-ray reproduce --config pipelines/configs/tiny-growlength.yaml --budget-time-s 90 --out results/tiny
    gl-ray status runs/tiny-growlength --watch 30
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from gl_ray.errors import UserError, unwrap_user_errors


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML run config: a path, or a shipped config's name (pythia-160m-growlength; "
                                    "see pipelines/configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, value parsed as YAML (repeatable), e.g. schedule.lengths=[128,512]")


def _verbose_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--verbose", action="store_true",
                   help="show Ray's own INFO lines too (by default only gl-ray's lines and Ray's warnings and errors)")


def _config_epilog() -> str:
    from gl_ray.config import describe_keys

    return "config keys (section.key = default: doc):\n" + describe_keys()


def plan_model(cfg, final_len: int):
    """The model of a config as `gl-ray plan` shows it, for the dataset's vocab when it is prepared (else a folder's
    own, or Pythia's 50277 for a preset)."""
    from gl_ray import storage
    from gl_ray.architectures import spec_for
    from gl_ray.data.manifest import load_manifest

    vocab, eos = (1 if cfg.model.config or cfg.model.init_from else 50277), 0
    try:
        if storage.exists(storage.join(cfg.data.path, "manifest.json")):
            manifest = load_manifest(cfg.data.path)
            vocab, eos = manifest.vocab_size, manifest.eos_token_id
    except UserError as e:  # planning a cluster's run from a laptop: the bucket may be out of reach from here
        print(f"gl-ray plan: the dataset's vocab is not known here ({e}); planning with {vocab}", file=sys.stderr)
    return spec_for(cfg.model, vocab_size=vocab, eos_id=eos, final_len=final_len)


def cmd_plan(args: argparse.Namespace) -> int:
    from gl_ray.config import load_config
    from gl_ray.schedule import format_plan, make_plan

    from gl_ray.architectures import model_line
    from gl_ray.train.preflight import attention_plan

    cfg = load_config(args.config, args.overrides)
    plan = make_plan(cfg)
    attention, line = attention_plan(cfg, plan)
    doc, text = plan.to_json() | {"attention": attention}, format_plan(plan) + (f"\n{line}" if line else "")
    spec = plan_model(cfg, plan.final_len)
    doc["model"] = spec.summary()
    text += "\n" + model_line(spec, plan.stages[0].seq_len)
    if cfg.data.packing == "decompose":
        from gl_ray.data.decompose import accounting, draws_for, format_buckets

        draws = draws_for(cfg.data, plan)  # reads the dataset's document lengths
        doc["buckets"] = accounting(draws, cfg.data)
        text += "\n" + format_buckets(draws, cfg.data, plan.time_mode)
    if cfg.data.sources or cfg.data.long_doc_boost:  # reads each source's manifest (its corpus size: when it starts
        # another epoch); long_doc_boost: data.path's document lengths
        from gl_ray.data.mixture import plan_mixture

        mixture_doc, mixture_text = plan_mixture(cfg.data, plan)
        doc, text = doc | mixture_doc, text + "\n" + mixture_text
    print(json.dumps(doc, indent=2) if args.json else text)
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from gl_ray.sizes import parse_size
    from gl_ray.data.prepare import prepare
    from gl_ray.data.recall import parse_recall_spec

    sample = parse_size(args.tokenizer_sample_bytes, "--tokenizer-sample-bytes")
    recall = parse_recall_spec(args.recall) if args.recall is not None else None
    manifest = prepare(args.source, args.out, tokenizer=args.tokenizer, val_fraction=args.val_fraction,
                       shard_tokens=args.shard_tokens, max_docs=args.max_docs, address=args.address,
                       overwrite=args.overwrite, resume=args.resume, no_ray=args.no_ray, workers=args.workers,
                       text_column=args.text_column, tokenizer_sample_bytes=sample, recall=recall,
                       verbose=args.verbose, token_dtype=args.token_dtype)
    tr, va = manifest["splits"]["train"], manifest["splits"]["val"]
    print(f"wrote {args.out}: vocab {manifest['vocab_size']}, train {tr['documents']} docs / {tr['tokens']:,} "
          f"tokens in {len(tr['shards'])} shards, val {va['documents']} docs / {va['tokens']:,} tokens")
    if recall:
        rc = manifest["recall"]["splits"]
        print("recall items: " + ", ".join(f"{s} {c['pairs']:,} pairs / {c['target_tokens']:,} targets "
                                           f"({c['target_tokens'] / max(manifest['splits'][s]['tokens'], 1):.1%})"
                                           for s, c in rc.items()))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from gl_ray.config import load_config
    from gl_ray.ray_utils import refuse_unused_address
    from gl_ray.train.driver import launch_run

    overrides = [*args.overrides, "ray.num_workers=0"] if args.no_ray else args.overrides
    cfg = load_config(args.config, overrides)
    if not cfg.ray.num_workers:  # before anything is written, as a bad address would be
        no_ray = "--no-ray" if args.no_ray else "ray.num_workers=0"
        refuse_unused_address(args.address, cfg.ray.address, no_ray=no_ray, use_ray="set ray.num_workers >= 1")
    launch_run(cfg, address=args.address, verbose=args.verbose, rewind_to=args.rewind_to,
               skip_steps=args.skip_steps)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from gl_ray.status import format_status, run_status, watch

    if args.watch is not None:
        watch(args.run, args.watch)
    else:
        print(format_status(run_status(args.run)))
    return 0


def writable_dir(path: str | Path, what: str) -> Path:
    """Create an output folder now, so that a bad --out fails before the work, with one line."""
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{what} {str(p)!r} cannot be a folder here: {e.strerror or e}") from None
    return p


def cmd_eval(args: argparse.Namespace) -> int:
    from gl_ray.evaluate import evaluate_models, format_eval
    from gl_ray.plots import plot_context, plot_eval

    out = Path(args.out or "eval.json")
    writable_dir(out.parent, "--out")
    if out.is_dir():
        raise UserError(f"--out {str(out)!r} is a folder; give the JSON file to write (PNGs go beside it)")
    res = evaluate_models(args.model, args.data, _ints(args.lengths, "--lengths"), max_tokens=args.max_tokens,
                          device=args.device, document_masking=args.document_masking, context=_context_settings(args))
    out.write_text(json.dumps(res, indent=1))
    pngs = [plot_eval(res, str(out.with_suffix(".png"))), *plot_context(res, str(out.with_suffix("")))]
    print(format_eval(res))
    print(f"wrote {out} and {', '.join(pngs)}")
    return 0


def _context_settings(args: argparse.Namespace):
    """The eval's context-metric flags as ContextSettings (checked against the lengths by evaluate_models)."""
    from gl_ray.evaluate import ContextSettings, parse_metrics

    depths = tuple(_floats(args.passkey_depths, "--passkey-depths"))
    return ContextSettings(metrics=parse_metrics(args.metrics), passkey_depths=depths,
                           passkey_trials=args.passkey_trials, passkey_tokens=args.passkey_tokens,
                           cue_tokens=args.cue_tokens, distractors=args.distractors, copy_trials=args.copy_trials,
                           copy_lengths=tuple(_ints(args.copy_lengths, "--copy-lengths")), seed=args.context_seed)


def cmd_bench(args: argparse.Namespace) -> int:
    from gl_ray.bench import bench_model, format_bench, run_bench
    from gl_ray.sizes import parse_size
    from gl_ray.plots import plot_bench

    cpu = args.device == "cpu"  # defaults sized for a GPU would take a CPU tens of minutes and gigabytes
    args.tokens_per_step = args.tokens_per_step or (8192 if cpu else 65536)
    args.micro_batch_tokens = args.micro_batch_tokens or (2048 if cpu else 16384)
    model = bench_model(preset=args.preset, vocab=args.vocab_size or (8192 if cpu else 50304),
                        attention=args.attention,
                        activation_checkpointing=args.activation_checkpointing,
                        document_masking=args.document_masking, data=args.data or "", mean_doc_len=args.mean_doc_len)
    lengths = _ints(args.lengths, "--lengths")
    print(f"[bench] {args.preset} on {args.device}: {len(lengths)} lengths, {args.tokens_per_step:,} tokens per step, "
          f"{args.warmup} + {args.steps} steps each, vocab {model.vocab:,}", flush=True)
    res = run_bench(model=model, lengths=lengths, progress=lambda line: print(line, flush=True),
                    tokens_per_step=args.tokens_per_step, micro_batch_tokens=args.micro_batch_tokens,
                    device=args.device, dtype=args.dtype, steps=args.steps, warmup=args.warmup,
                    memory_micro_batch_seqs=args.memory_micro_batch,
                    memory_budget=parse_size(args.memory_budget) if args.memory_budget else 0,
                    peak_tflops=args.peak_tflops, use_compile=args.compile)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "-".join(["bench", Path(args.preset).name, res["device"]] + (["masked"] if args.document_masking else [])
                    + (["ac"] if args.activation_checkpointing else []))
    (out / f"{stem}.json").write_text(json.dumps(res, indent=1))
    table = format_bench(res)
    (out / f"{stem}.md").write_text(f"# {args.preset} on {res['device_name']}\n\n{table}\n")
    plot_bench(res, str(out / f"{stem}.png"))
    print(table)
    print(f"wrote {out}/{stem}.json, .md, .png")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from gl_ray.evaluate import read_eval
    from gl_ray.report import build_report, format_report

    ev = read_eval(args.eval) if args.eval else None
    writable_dir(args.out, "--out")
    rep = build_report(args.runs, args.out, smooth=args.smooth, baseline=args.baseline, eval_res=ev)
    print(format_report(rep))
    print(f"wrote {args.out}/report.md, report.json and PNGs")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from gl_ray.tune import run_tune

    res = run_tune(args.config, args.space, args.overrides, args.num_samples, args.address)
    print(open(f"{res['tune_dir']}/results.md").read())
    if "best" in res:
        print(f"best config: {res['tune_dir']}/best.yaml (gl-ray train --config {res['tune_dir']}/best.yaml)")
    return 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    from gl_ray.evaluate import ContextSettings, parse_metrics
    from gl_ray.ray_utils import refuse_unused_address
    from gl_ray.reproduce import reproduce

    if args.workers == 0:
        refuse_unused_address(args.address, "", no_ray="--workers 0", use_ray="set --workers >= 1")
    reproduce(base_config=args.config, data=args.data, out=args.out, budget_tokens=args.budget_tokens,
              budget_time_s=args.budget_time_s, ratios=args.ratios, seeds=args.seeds, modes=args.modes,
              workers=args.workers,
              eval_lengths=_ints(args.eval_lengths, "--eval-lengths") or None, eval_tokens=args.eval_tokens,
              eval_context=ContextSettings(metrics=parse_metrics(args.eval_metrics)), extra=args.overrides,
              address=args.address)
    return 0


def _ints(text: str, flag: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"{flag} {text!r}: expected comma-separated integers, e.g. 128,256,512") from None


def _floats(text: str, flag: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"{flag} {text!r}: expected comma-separated numbers, e.g. 0.1,0.5,0.9") from None


def _add_plan(sub) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser("plan", help="print the stage plan of a run config", formatter_class=fmt,
                       epilog=_config_epilog())
    _config_args(p)
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=cmd_plan)


def _add_prepare(sub) -> None:
    p = sub.add_parser("prepare", help="tokenize a corpus into Parquet token shards")
    p.add_argument("--source", default="stdlib",
                   help="stdlib (default), a folder, file or glob (.txt/.md/.rst/.py, .jsonl, .parquet, .arrow; "
                        "text and .jsonl may be .gz or .zst), a `datasets` save_to_disk folder, s3://bucket/prefix, "
                        "hf:NAME[:CONFIG][@SPLIT] (a `datasets` stream: hub name, local folder or data file), "
                        "or tokens:PATH (pre-tokenized .npy/.bin id arrays, EOS between documents; with --tokenizer "
                        "FOLDER)")
    p.add_argument("--out", required=True, help="destination folder or s3://bucket/prefix")
    p.add_argument("--tokenizer", default="train:8192",
                   help="train:VOCAB (byte-level BPE trained on a sample of the corpus), a local HF folder, or a "
                        "hub name")
    p.add_argument("--tokenizer-sample-bytes", default="32MiB",
                   help="corpus text the BPE trainer reads with train:VOCAB (a deterministic sample; e.g. 256MiB)")
    p.add_argument("--text-column", default="text", help="the text field of .jsonl and column of Parquet/Arrow")
    p.add_argument("--token-dtype", default="auto", help="tokens:PATH: the ids' type in raw files, uint16 | uint32 "
                                                         "(auto: an .npy header's, else uint16)")
    p.add_argument("--val-fraction", type=float, default=0.01, help="share of documents in the val split")
    p.add_argument("--shard-tokens", type=int, default=1 << 24, help="target tokens per Parquet shard")
    p.add_argument("--max-docs", type=int, default=0, help="use only the first N documents (0: all)")
    p.add_argument("--overwrite", action="store_true", help="replace a dataset (or an interrupted prepare) at --out")
    p.add_argument("--resume", action="store_true", help="finish an interrupted prepare into --out (same settings)")
    p.add_argument("--workers", type=int, default=0, help="tokenize tasks at once (0: one per CPU of the cluster)")
    p.add_argument("--no-ray", action="store_true", help="tokenize in this process (no Ray needed)")
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or local)")
    p.add_argument("--recall", nargs="?", const="", default=None, metavar="KEY=VALUE,...",
                   help="insert key-value recall items into every document (alone: the defaults), e.g. "
                        "target_fraction=0.03,items=64,key_len=1,value_len=2,min_distance=16,max_distance=4096,"
                        "seed=0 (see gl_ray.data.recall)")
    _verbose_arg(p)
    p.set_defaults(func=cmd_prepare)


def _add_train(sub) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser("train", help="run GrowLength pretraining", formatter_class=fmt, epilog=_config_epilog())
    _config_args(p)
    p.add_argument("--no-ray", action="store_true", help="run in one process without Ray (same as ray.num_workers=0)")
    p.add_argument("--address", default=None, help="Ray cluster address (default: ray.address, RAY_ADDRESS, local)")
    p.add_argument("--rewind-to", type=int, default=None, metavar="STEP",
                   help="resume from this earlier checkpoint of the run (after a divergence); the later ones are "
                        "moved to RUN/rewound/")
    p.add_argument("--skip-steps", type=int, default=0, metavar="N",
                   help="with --rewind-to: leave out the data of the N steps after that checkpoint")
    _verbose_arg(p)
    p.set_defaults(func=cmd_train)


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="perplexity and context use (by position, recall, passkey, copy) of trained "
                       "models at each context length (no Ray)")
    p.add_argument("--model", action="append", required=True, help="HF model folder, e.g. RUN/final (repeatable)")
    p.add_argument("--data", required=True, help="prepared dataset (its val split is used)")
    p.add_argument("--lengths", default="128,256,512,1024,2048", help="comma-separated context lengths")
    p.add_argument("--max-tokens", type=int, default=262144, help="val tokens used at every length")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--document-masking", action="store_true",
                   help="attention within documents, positions restarting per document (as data.document_masking)")
    _context_args(p)
    p.add_argument("--out", default=None,
                   help="JSON output (PNGs beside it: NAME.png, NAME_position.png, ...); default eval.json")
    p.set_defaults(func=cmd_eval)


def _context_args(p: argparse.ArgumentParser) -> None:
    """The context-metric flags of eval (defaults: ContextSettings's)."""
    p.add_argument("--metrics", default="position,recall,passkey,copy",
                   help="context-use metrics beside loss and perplexity: a subset of position,recall,passkey,copy, "
                        "or none")
    p.add_argument("--passkey-depths", default="0.1,0.5,0.9", help="where the key goes, fractions of the window")
    p.add_argument("--passkey-trials", type=int, default=4, help="windows per depth and length")
    p.add_argument("--passkey-tokens", type=int, default=4, help="random tokens in a key")
    p.add_argument("--cue-tokens", type=int, default=4, help="random tokens in the fixed cue before each key")
    p.add_argument("--distractors", type=int, default=7, help="random keys the true key is ranked against")
    p.add_argument("--copy-trials", type=int, default=2, help="windows per copy length and length")
    p.add_argument("--copy-lengths", default="",
                   help="comma-separated copy lengths d (default: 2, 4, ..., L/2 at each length L)")
    p.add_argument("--context-seed", type=int, default=0,
                   help="seed of keys, cue and copy tokens (the same for every model)")


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="time, memory and max batch per length: the paper's Tables 1-3 (no Ray)")
    p.add_argument("--preset", default="pythia-160m", help="model preset, or a folder with an HF config.json")
    p.add_argument("--lengths", default="128,256,512,1024,2048", help="comma-separated sequence lengths")
    p.add_argument("--tokens-per-step", type=int, default=0,
                   help="tokens per optimizer step (Table 1; default 65536 on cuda, 8192 on cpu)")
    p.add_argument("--micro-batch-tokens", type=int, default=0,
                   help="tokens per forward pass (Table 1; default 16384 on cuda, 2048 on cpu)")
    p.add_argument("--device", default="cuda" if _has_cuda() else "cpu", help="cpu | cuda")
    p.add_argument("--dtype", default="auto", choices=("auto", "bf16", "fp32"),
                   help="auto (bf16 autocast on cuda, fp32 on cpu) | bf16 | fp32, as train.precision")
    p.add_argument("--steps", type=int, default=5, help="timed steps per length (median)")
    p.add_argument("--warmup", type=int, default=2, help="untimed warm-up steps per length")
    p.add_argument("--memory-micro-batch", type=int, default=8, help="sequences per micro batch for Table 2")
    p.add_argument("--memory-budget", default=None, help="memory budget for Table 3, e.g. 16GiB (off if unset)")
    p.add_argument("--vocab-size", type=int, default=0,
                   help="embedding rows (default: Pythia's 50304 on cuda, 8192 on cpu; --data: the dataset's)")
    p.add_argument("--peak-tflops", type=float, default=0.0,
                   help="dense bf16 peak TFLOP/s for MFU (default: by exact GPU name, gl_ray.bench.PEAK_TFLOPS)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model for Table 1, as train.compile")
    p.add_argument("--attention", default="sdpa", help="sdpa | flex | flash_attention_2, as model.attention")
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute block activations in backward, as train.activation_checkpointing")
    p.add_argument("--document-masking", action="store_true",
                   help="rows hold several documents, attention masked per document (needs --data or --mean-doc-len)")
    p.add_argument("--data", default=None, help="prepared dataset whose documents fill the rows (and set the vocab)")
    p.add_argument("--mean-doc-len", type=int, default=0, help="random documents of this mean length (tokens)")
    p.add_argument("--out", default="bench", help="output folder")
    p.set_defaults(func=cmd_bench)


def _add_tune(sub) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser("tune", help="Ray Tune search over ladders, ratios and optimizer settings",
                       formatter_class=fmt, epilog=_config_epilog())
    _config_args(p)
    p.add_argument("--space", required=True, help="search space YAML: a path, or a shipped space's name (ladders; "
                                                  "see tune_spaces/)")
    p.add_argument("--num-samples", type=int, default=None, help="override the space's num_samples")
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or local)")
    p.set_defaults(func=cmd_tune)


def _add_report(sub) -> None:
    p = sub.add_parser("report", help="compare runs: loss vs time/tokens, per-stage table, time to common loss")
    p.add_argument("runs", nargs="+", help="run folders ({storage_path}/{name}), local or s3://")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--smooth", type=int, default=5, help="reports in the running mean of the training loss")
    p.add_argument("--baseline", default=None,
                   help="run whose final val loss is the target (default: the fixed run at the longest length)")
    p.add_argument("--eval", default=None, metavar="EVAL.json",
                   help="a `gl-ray eval` result of the runs' final models: their context-use numbers join the tables")
    p.set_defaults(func=cmd_report)


def _add_reproduce(sub) -> None:
    p = sub.add_parser("reproduce", help="the paper's comparison: GrowLength vs fixed shortest vs fixed longest at "
                       "one budget, then report and eval")
    p.add_argument("--config", default="tiny-growlength", help="GrowLength base config (a path or a shipped name)")
    p.add_argument("--data", default="data/stdlib", help="prepared dataset")
    p.add_argument("--budget-tokens", type=int, default=0, help="the same token budget for every run")
    p.add_argument("--budget-time-s", type=float, default=0.0, help="or the same wall-time budget")
    p.add_argument("--ratios", default="", help="ratio ablation: ratio sets separated by ';'")
    p.add_argument("--modes", default="reshape",
                   help="ways to grow the length of the GrowLength arms, comma-separated: reshape (default), window, "
                        "decompose (data.packing=decompose)")
    p.add_argument("--seeds", type=int, default=1,
                   help="runs per arm (train.seed and data.seed + 0..N-1: weight init, data order)")
    p.add_argument("--workers", type=int, default=None, help="override ray.num_workers (0: no Ray)")
    p.add_argument("--eval-lengths", default="", help="comma-separated lengths for eval (default: derived)")
    p.add_argument("--eval-tokens", type=int, default=0, help="val tokens per eval length (0: 64 longest windows)")
    p.add_argument("--eval-metrics", default="position,recall,passkey,copy",
                   help="context-use metrics of the eval (as gl-ray eval --metrics; none: loss and perplexity only)")
    p.add_argument("--out", default="results", help="output folder")
    p.add_argument("--address", default=None, help="Ray cluster address (default: ray.address, RAY_ADDRESS, local)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key in every run (repeatable)")
    p.set_defaults(func=cmd_reproduce)


def _add_status(sub) -> None:
    p = sub.add_parser("status", help="where a run stands, from its folder (local or s3://), without Ray")
    p.add_argument("run", help="run folder: {ray.storage_path}/{name}")
    p.add_argument("--watch", type=float, nargs="?", const=30.0, default=None, metavar="SECONDS",
                   help="print again every SECONDS (default 30) until the run finishes")
    p.set_defaults(func=cmd_status)


def build_parser() -> argparse.ArgumentParser:
    from gl_ray import __version__

    parser = argparse.ArgumentParser(prog="gl-ray", description="GrowLength pretraining on Ray.")
    parser.add_argument("--version", action="version", version=f"gl-ray {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_plan, _add_prepare, _add_train, _add_status, _add_eval, _add_bench, _add_tune, _add_report,
                _add_reproduce):
        add(sub)
    return parser


def _has_cuda() -> bool:
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return torch.cuda.is_available()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with unwrap_user_errors():  # a user error may arrive wrapped by Ray; anything else is a bug: traceback
            return args.func(args)
    except UserError as user:
        print(f"gl-ray {args.command}: error: {user}", file=sys.stderr)
        return user.exit_code
    except KeyboardInterrupt:
        print(f"gl-ray {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
