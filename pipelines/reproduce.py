"""`python -m pipelines.reproduce --config ... --data ... --budget-time-s 120 --out results/tiny [...]`.

The same as `gl-ray reproduce`: GrowLength vs fixed shortest vs fixed longest at one budget, then report + eval.
"""

import sys

from gl_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["reproduce", *sys.argv[1:]]))
