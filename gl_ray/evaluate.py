"""`gl-ray eval`: loss and perplexity of trained models on the val split at each context length.

The paper's context-window-extension test (its Figure 4): every length cuts the *same* tokens into
non-overlapping windows (the first `max_tokens` val tokens, rounded down to a multiple of the longest length),
including lengths beyond the lengths a model was trained at. No Ray.

    res = evaluate_models(["runs/a/final"], "data/stdlib", [128, 256, 512, 1024])
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch

from gl_ray.data.stream import TokenStream, check_document_ends
from gl_ray.devices import autocast_for, pick_device
from gl_ray.errors import UserError
from gl_ray.model import batch_inputs, lm_loss


def load_model(path: str, device: torch.device):
    from transformers import AutoModelForCausalLM

    if not (Path(path) / "config.json").is_file():
        raise UserError(f"--model {path!r} is not a Hugging Face model folder (config.json missing); "
                        "pass a run's final/ folder")
    try:
        model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa")
    except Exception as e:  # a truncated or foreign file: safetensors, torch and transformers raise their own
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise UserError(f"cannot load model {path!r}: {first}") from None
    return model.to(device).eval()


@torch.no_grad()
def window_loss(model, tokens: np.ndarray, seq_len: int, batch_tokens: int, device: torch.device,
                eos_id: int | None = None) -> tuple[float, int]:
    """Mean next-token loss over non-overlapping windows of seq_len; returns (loss, windows). With `eos_id`
    (document masking) attention stays within each document of a window and positions restart per document."""
    n = len(tokens) // seq_len
    rows = torch.from_numpy(np.array(tokens[: n * seq_len], dtype=np.int64).reshape(n, seq_len))
    mb = max(1, batch_tokens // seq_len)
    amp = autocast_for(device, "auto")
    total = 0.0
    for i in range(0, n, mb):
        x = rows[i: i + mb].to(device)
        inputs = batch_inputs(x, position_mode="extrapolate", seq_len=seq_len, final_len=seq_len, eos_id=eos_id)
        with amp():
            total += float(lm_loss(model, x, **inputs)) * len(x)
    return total / n, n


def evaluate_models(models: list[str], data: str, lengths: list[int], max_tokens: int = 262144,
                    batch_tokens: int = 16384, device: str = "auto", document_masking: bool = False,
                    progress=print) -> dict:
    """Loss and perplexity of each model at each length on the same val tokens; progress(line) after each."""
    if not lengths or any(L <= 1 for L in lengths):
        raise UserError(f"--lengths {lengths} must be lengths > 1")
    if max_tokens <= 0:
        raise UserError(f"--max-tokens {max_tokens} must be positive")
    dev = pick_device(device)
    val = TokenStream(data, "val")
    longest = max(lengths)
    usable = min(max_tokens, val.tokens) // longest * longest
    if usable == 0:
        raise UserError(f"the val split of {data!r} has {val.tokens} tokens, fewer than one window of {longest}")
    if document_masking:
        check_document_ends(val)
    eos_id = val.manifest.eos_token_id if document_masking else None
    tokens = val.read(0, usable)
    out: dict = {"data": data, "tokens": usable, "lengths": sorted(lengths), "document_masking": document_masking,
                 "models": {}}
    t0 = time.perf_counter()
    for i, path in enumerate(models):
        model = load_model(path, dev)
        if model.config.vocab_size < val.manifest.vocab_size:
            raise UserError(f"model {path!r} has vocab {model.config.vocab_size}, smaller than the dataset's "
                            f"{val.manifest.vocab_size}: it was trained on another tokenizer")
        rows = {}
        for L in sorted(lengths):
            loss, windows = window_loss(model, tokens, L, batch_tokens, dev, eos_id)
            rows[str(L)] = {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "windows": windows,
                            "beyond_trained": L > _trained_len(path)}
            progress(f"[eval] model {i + 1}/{len(models)} {model_label(path)} L={L}: loss {loss:.4f} "
                     f"({time.perf_counter() - t0:.0f} s so far)")
        out["models"][model_label(path)] = rows
    return out


def _trained_len(path: str) -> int:
    """The last stage length of the run that produced a final/ folder (from its plan.json), else max positions."""
    import json

    plan = Path(path).parent / "plan.json"
    if plan.is_file():
        return json.loads(plan.read_text())["stages"][-1]["seq_len"]
    cfg = json.loads((Path(path) / "config.json").read_text())
    return int(cfg.get("max_position_embeddings", 0))


def model_label(path: str) -> str:
    p = Path(path).resolve()
    return p.parent.name if p.name == "final" else p.name


def format_eval(res: dict) -> str:
    lengths = res["lengths"]
    rows = ["| model | " + " | ".join(f"ppl@{L}" for L in lengths) + " |",
            "| --- | " + " | ".join("---" for _ in lengths) + " |"]
    for name, r in res["models"].items():
        cells = [f"{r[str(L)]['ppl']:.2f}" + ("*" if r[str(L)]["beyond_trained"] else "") for L in lengths]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    rows.append(f"\n{res['tokens']:,} val tokens at every length; * = longer than the model's last training length")
    return "\n".join(rows)
