"""`gl-ray` command line: thin shims that parse arguments and call one library function each.

    gl-ray plan --config pipelines/configs/tiny-growlength.yaml --set schedule.lengths=[64,128]
    gl-ray prepare --source stdlib --out data/stdlib
    gl-ray train --config pipelines/configs/tiny-growlength.yaml
"""

from __future__ import annotations

import argparse
import json
import sys

from gl_ray.errors import EXIT_USER_ERROR, UserError, find_user_error


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML run config (see pipelines/configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, value parsed as YAML (repeatable), e.g. schedule.lengths=[128,512]")


def _config_epilog() -> str:
    from gl_ray.config import describe_keys

    return "config keys (section.key = default: doc):\n" + describe_keys()


def cmd_plan(args: argparse.Namespace) -> int:
    from gl_ray.config import load_config
    from gl_ray.schedule import format_plan, make_plan

    cfg = load_config(args.config, args.overrides)
    plan = make_plan(cfg)
    print(json.dumps(plan.to_json(), indent=2) if args.json else format_plan(plan))
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from gl_ray.data.prepare import prepare

    manifest = prepare(args.source, args.out, tokenizer=args.tokenizer, val_fraction=args.val_fraction,
                       shard_tokens=args.shard_tokens, max_docs=args.max_docs, address=args.address,
                       overwrite=args.overwrite)
    tr, va = manifest["splits"]["train"], manifest["splits"]["val"]
    print(f"wrote {args.out}: vocab {manifest['vocab_size']}, train {tr['documents']} docs / {tr['tokens']:,} "
          f"tokens in {len(tr['shards'])} shards, val {va['documents']} docs / {va['tokens']:,} tokens")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from gl_ray.train.driver import train_from_args

    train_from_args(args.config, args.overrides, no_ray=args.no_ray, address=args.address)
    return 0


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="gl-ray", description="GrowLength pretraining on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("plan", help="print the stage plan of a run config", formatter_class=fmt,
                       epilog=_config_epilog())
    _config_args(p)
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("prepare", help="tokenize a corpus into Parquet token shards")
    p.add_argument("--source", default="stdlib",
                   help="stdlib (default), a folder or glob of text files, or s3://bucket/prefix")
    p.add_argument("--out", required=True, help="destination folder or s3://bucket/prefix")
    p.add_argument("--tokenizer", default="train:8192",
                   help="train:VOCAB (byte-level BPE trained on the corpus), a local HF folder, or a hub name")
    p.add_argument("--val-fraction", type=float, default=0.01, help="share of documents in the val split")
    p.add_argument("--shard-tokens", type=int, default=1 << 24, help="target tokens per Parquet shard")
    p.add_argument("--max-docs", type=int, default=0, help="use only the first N documents (0: all)")
    p.add_argument("--overwrite", action="store_true", help="replace a dataset already at --out")
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or local)")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("train", help="run GrowLength pretraining", formatter_class=fmt, epilog=_config_epilog())
    _config_args(p)
    p.add_argument("--no-ray", action="store_true", help="run in one process without Ray (same as ray.num_workers=0)")
    p.add_argument("--address", default=None, help="Ray cluster address (default: ray.address, RAY_ADDRESS, local)")
    p.set_defaults(func=cmd_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except Exception as e:  # a user error may arrive wrapped by Ray; anything else is a bug: traceback
        user = e if isinstance(e, UserError) else find_user_error(e)
        if user is None:
            raise
        print(f"gl-ray {args.command}: error: {user}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"gl-ray {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
