"""`ray job submit ... -- python -m pipelines.pretrain --config pipelines/configs/X.yaml [--set k=v ...]`.

The same as `gl-ray train`: joins the cluster of the job (RAY_ADDRESS) and trains.
"""

import sys

from gl_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
