"""`ray job submit ... -- python -m pipelines.tune_schedule --space tune_spaces/ladders.yaml [--set k=v ...]`.

The same as `gl-ray tune`.
"""

import sys

from gl_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
