"""Does a model learn to retrieve from its context here, and after how many steps? (issue 24)

    python -m benchmarks.induction_probe --preset tiny --length 128 --span 64 --spans 1 --distance 64 --steps 1000
    python -m benchmarks.induction_probe --preset tiny --length 256 --span 16 --spans 2 --distance 16:200 \
        --filler data/stdlib1k --steps 1200 --out probe.json

Trains gl-ray's model (a preset, RoPE on --rotary of each head) from scratch on fresh random rows of --length
tokens. In each row, --spans spans of --span tokens drawn from --items item ids are each written again --distance
tokens later: one fixed offset (`64`; a head that looks a fixed number of tokens back is enough) or log-uniform in
[LO, HI) (`16:200`; the copy must be found by content, an induction head). Between them: random item tokens
(--filler random) or a prepared dataset's train tokens (--filler DATA, its vocab; the items are its top ids). The
targets are each copy's tokens after its first, where the copy and the token before it survived later spans. The
loss is on every next token (--loss all, as in pretraining) or on the targets only (--loss targets, as synthetic
recall tasks such as Zoology's MQAR train).

Every step trains on a new batch, so its target accuracy (top-1, before the update) is a held-out score; the
curve is its mean over each --log-every steps. Reports the curve, chance (1 / items), and the first step at
which the mean reaches 0.5 (null: never). No Ray; --device cuda for a GPU. The `gl-ray prepare --recall` corpus
and benchmarks/recall_probe.py score the same ability inside real training runs.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import pyarrow as pa
import torch

from gl_ray.data.manifest import load_manifest, read_shard_tokens
from gl_ray.errors import UserError
from gl_ray.model import GrowLengthLM, model_config

LEARNED = 0.5  # mean target accuracy counted as "learned"


def parse_distance(text: str) -> tuple[int, int]:
    """`D` (fixed) or `LO:HI` (log-uniform in [LO, HI)) -> (lo, hi), hi == lo when fixed."""
    lo, _, hi = text.partition(":")
    try:
        lo_i, hi_i = int(lo), int(hi or lo)
    except ValueError:
        raise UserError(f"--distance {text!r}: expected D or LO:HI (integers)") from None
    if lo_i < 2 or hi_i < lo_i:
        raise UserError(f"--distance {text!r}: needs 2 <= LO <= HI")
    return lo_i, hi_i


class Rows:
    """Seeded rows with copied spans: (tokens [batch, length], targets bool [batch, length])."""

    def __init__(self, length: int, span: int, spans: int, distance: tuple[int, int], items: np.ndarray,
                 filler: np.ndarray | None, seed: int):
        if distance[1] + span > length:
            raise UserError(f"--distance up to {distance[1]} plus --span {span} does not fit in --length {length}")
        self.length, self.span, self.spans, self.distance = length, span, spans, distance
        self.items, self.filler = items, filler
        self.rng = np.random.default_rng(seed)

    def _distance(self) -> int:
        lo, hi = self.distance
        return lo if lo == hi else int(math.exp(self.rng.uniform(math.log(lo), math.log(hi))))

    def row(self) -> tuple[np.ndarray, np.ndarray]:
        T, L, rng = self.length, self.span, self.rng
        if self.filler is None:
            x = rng.choice(self.items, T)
        else:
            start = int(rng.integers(0, len(self.filler) - T))
            x = self.filler[start:start + T].astype(np.int64)
        placed = []
        for _ in range(self.spans):
            d = self._distance()
            i = int(rng.integers(0, T - d - L + 1))
            x[i:i + L] = x[i + d:i + d + L] = rng.choice(self.items, L)
            placed.append((i, d))
        targets = np.zeros(T, bool)
        for i, d in placed:  # a later span may have overwritten part of an earlier one: keep what still copies
            k = np.arange(i + 1, i + L)
            targets[k[(x[k + d] == x[k]) & (x[k + d - 1] == x[k - 1])] + d] = True
        return x, targets

    def batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ts = zip(*(self.row() for _ in range(n)))
        return torch.as_tensor(np.stack(xs)), torch.as_tensor(np.stack(ts))


def filler_tokens(data: str) -> tuple[np.ndarray, int]:
    m = load_manifest(data)
    ids = pa.concat_arrays([read_shard_tokens(s, m.vocab_size) for s in m.shards("train")])
    return ids.to_numpy().astype(np.int64), m.vocab_size


def run(args) -> dict:
    distance = parse_distance(args.distance)
    if args.filler == "random":
        filler, vocab = None, args.items
        items = np.arange(args.items)
    else:
        filler, vocab = filler_tokens(args.filler)
        if args.items >= vocab:
            raise UserError(f"--items {args.items}: must be fewer than the data's vocab ({vocab})")
        items = np.arange(vocab - args.items, vocab)
    rows = Rows(args.length, args.span, args.spans, distance, items, filler, args.seed)
    device = torch.device(args.device)
    cfg = model_config(args.preset, vocab, args.length)
    cfg.rope_parameters = {**cfg.rope_parameters, "partial_rotary_factor": args.rotary}
    torch.manual_seed(args.seed)
    model = GrowLengthLM(cfg).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=args.dtype == "bf16")
    curve, hits, counts, losses = [], 0, 0, []
    t0 = time.perf_counter()
    learned_at = None
    for step in range(1, args.steps + 1):
        x, t = (v.to(device) for v in rows.batch(args.batch))
        for g in opt.param_groups:
            g["lr"] = args.lr * min(1.0, step / args.warmup)
        with autocast:
            logits = model(input_ids=x).logits  # without labels: the stock forward
        labels = x[:, 1:] if args.loss == "all" else x[:, 1:].masked_fill(~t[:, 1:], -100)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        tt = t[:, 1:]
        hits += int((logits[:, :-1].argmax(-1)[tt] == x[:, 1:][tt]).sum())
        counts += int(tt.sum())
        losses.append(loss.item())
        if step % args.log_every == 0 or step == args.steps:
            acc = hits / max(counts, 1)
            curve.append({"step": step, "loss": round(float(np.mean(losses)), 4), "target_acc": round(acc, 4),
                          "targets": counts, "seconds": round(time.perf_counter() - t0, 1)})
            print(f"[induction_probe] step {step}: loss {curve[-1]['loss']:.3f}, target accuracy {acc:.3f} "
                  f"(chance {1 / args.items:.3f}), {curve[-1]['seconds']:.0f} s", flush=True)
            if learned_at is None and acc >= LEARNED:
                learned_at = step
            hits, counts, losses = 0, 0, []
    return {"args": vars(args), "chance": 1 / args.items, "vocab": vocab, "learned_at_step": learned_at,
            "learned_threshold": LEARNED, "seconds": round(time.perf_counter() - t0, 1), "curve": curve}


def format_table(result: dict) -> str:
    """Markdown: what was trained, and the target accuracy by step."""
    a = result["args"]
    learned = (f"learned (accuracy >= {result['learned_threshold']}) at step {result['learned_at_step']}"
               if result["learned_at_step"] else f"not learned in {a['steps']} steps")
    head = (f"Retrieval by content (`benchmarks/induction_probe.py`): {a['preset']} (RoPE on {a['rotary']:.0%} of each "
            f"head), rows of {a['length']}, {a['spans']} spans of {a['span']} copied at distance {a['distance']}, "
            f"filler {a['filler']}, loss on {a['loss']}, batch {a['batch']}, LR {a['lr']}: {learned} "
            f"({result['seconds']:.0f} s; chance {result['chance']:.3f}).")
    rows = [f"| {c['step']} | {c['loss']:.3f} | {c['target_acc']:.3f} | {c['seconds']:.0f} |" for c in result["curve"]]
    return "\n".join([head, "", "| step | loss | target accuracy | s |", "| --- | --- | --- | --- |", *rows])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--rotary", type=float, default=0.25, help="share of each head's dims that RoPE rotates")
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--span", type=int, default=16)
    p.add_argument("--spans", type=int, default=2, help="copied spans per row")
    p.add_argument("--distance", default="16:200", help="D (fixed) or LO:HI (log-uniform)")
    p.add_argument("--items", type=int, default=256, help="ids the spans (and random filler) are drawn from")
    p.add_argument("--filler", default="random", help="random, or a prepared dataset folder (its train tokens)")
    p.add_argument("--loss", default="all", choices=("all", "targets"),
                   help="all: every next token (language modelling); targets: the copy targets only")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=50, help="steps of linear LR warmup")
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--out", default=None, help="write the JSON here")
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    try:
        result = run(args)
    except UserError as e:
        print(f"error: {e}")
        return 2
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    print(f"[induction_probe] learned (accuracy >= {LEARNED}) at step {result['learned_at_step']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
