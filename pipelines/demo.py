"""`make demo`: prepare the embedded stdlib corpus (once) and train tiny-growlength.yaml on local Ray.

    python -m pipelines.demo [--max-docs N] [--verbose] [--set k=v ...]
"""

import argparse
import sys
from pathlib import Path

from gl_ray.cli import main

CONFIG = "pipelines/configs/tiny-growlength.yaml"
DATA = "data/stdlib"


def demo(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m pipelines.demo")
    p.add_argument("--max-docs", type=int, default=0, help="stdlib documents to prepare (0: all)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--verbose", action="store_true", help="show Ray's own INFO lines too")
    args = p.parse_args(argv)
    verbose = ["--verbose"] if args.verbose else []
    if not (Path(DATA) / "manifest.json").exists():
        print(f"[demo] preparing the stdlib corpus into {DATA} ...", flush=True)
        rc = main(["prepare", "--source", "stdlib", "--out", DATA, "--max-docs", str(args.max_docs),
                   "--val-fraction", "0.02", *verbose])
        if rc:
            return rc
    print(f"[demo] training {CONFIG} on local Ray ...", flush=True)
    sets = [x for kv in args.overrides for x in ("--set", kv)]
    return main(["train", "--config", CONFIG, "--set", f"data.path={DATA}", *sets, *verbose])


if __name__ == "__main__":
    sys.exit(demo(sys.argv[1:]))
