"""Bytes kept for backward by one forward pass with document masks: sdpa's dense [batch, 1, L, L] mask against
flex's block mask and flash's document offsets (flex and flash: the CPU stub kernels of benchmarks/stub_kernels.py,
which keep what the real kernels keep). Tiny preset, 4 rows.

    python -m benchmarks.mask_memory --lengths 128,512
"""

from __future__ import annotations

import argparse
import sys

sys.path.insert(0, "tests")
from test_attention import masked_inputs, rows, saved_bytes  # noqa: E402

from benchmarks.stub_kernels import stub_kernels  # noqa: E402
from gl_ray.model import build_model  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", default="128,512")
    a = p.parse_args()
    print("| L | backend | saved MB | of it L x L tensors MB |\n| --- | --- | ---: | ---: |")
    for L in (int(v) for v in a.lengths.split(",")):
        x = rows(5, batch=4, seq_len=L)
        for name in ("sdpa", "flex", "flash_attention_2"):
            with stub_kernels():
                total, masks = saved_bytes(build_model("tiny", 256, L, seed=1, attention=name), x,
                                           masked_inputs(x, name))
            print(f"| {L} | {name} | {total / 1e6:.1f} | {masks / 1e6:.2f} |")


if __name__ == "__main__":
    main()
