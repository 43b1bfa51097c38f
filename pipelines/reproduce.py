"""Reproduce the paper's comparison: GrowLength vs fixed shortest vs fixed longest at one budget, then report + eval.

    python -m pipelines.reproduce --config pipelines/configs/tiny-growlength.yaml --data data/stdlib \\
        --budget-time-s 120 --out results/tiny [--ratios "0.25,0.25,0.25,0.25;0.4,0.3,0.2,0.1"] [--workers 0]
"""

import argparse
import sys

from gl_ray.errors import EXIT_USER_ERROR, UserError


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m pipelines.reproduce")
    p.add_argument("--config", default="pipelines/configs/tiny-growlength.yaml", help="GrowLength base config")
    p.add_argument("--data", default="data/stdlib", help="prepared dataset")
    p.add_argument("--budget-tokens", type=int, default=0, help="the same token budget for every run")
    p.add_argument("--budget-time-s", type=float, default=0.0, help="or the same wall-time budget")
    p.add_argument("--ratios", default="", help="ratio ablation: ratio sets separated by ';'")
    p.add_argument("--workers", type=int, default=None, help="override ray.num_workers (0: no Ray)")
    p.add_argument("--eval-lengths", default="", help="comma-separated lengths for eval (default: derived)")
    p.add_argument("--out", default="results", help="output folder")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    a = p.parse_args(argv)
    from gl_ray.reproduce import reproduce

    try:
        lengths = [int(x) for x in a.eval_lengths.split(",") if x] or None
        reproduce(a.config, a.data, a.out, a.budget_tokens, a.budget_time_s, a.ratios, a.workers, lengths,
                  a.overrides)
    except (UserError, ValueError) as e:
        print(f"reproduce: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
