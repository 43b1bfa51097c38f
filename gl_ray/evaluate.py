"""`gl-ray eval`: loss and perplexity of trained models on the val split at each context length, and how much of
that context each model uses. No Ray.

The paper's context-window-extension test (its Figure 4): every length cuts the *same* tokens into
non-overlapping windows (the first `max_tokens` val tokens, rounded down to a multiple of the longest length),
including lengths beyond the lengths a model was trained at. One forward pass per window gives the loss and, per
target token, its loss and top-1 hit, from which `gl_ray.context` computes (all four by default, `metrics`):

- position: mean loss by the target's position t in the window (log2 buckets [1,2), [2,4), ..., [L/2, L)),
  and, when the tokens hold EOS boundaries, by position within the document (`doc_position`);
- recall: Zoology's associative-recall hits (x[t-1] seen before at j, nearest, and x[j+1] == x[t]) by distance
  t-1-j: loss, top-1 accuracy and count per bucket, and the non-hits' loss;
- passkey: `cue + key` (random tokens) at each depth of a window of val text, `cue + key` again at its end:
  the key's mean log-likelihood there, and how often the true key outranks `distractors` random keys (a trial's
  candidate windows share one packed row, each candidate its own branch: `gl_ray.context.PasskeyProbe`);
- copy: d random tokens then the same d tokens at the end of a window of val text (d = 2, 4, ..., L/2; short
  d: several such pairs filling the window's last quarter): loss on the first copies, on the second copies, and
  score = first - second (the induction score at distance d).

Probe windows (passkey, copy) are built once from a seed and are the same for every model; their text is the
val tokens with EOS taken out (one document, so document masking does not cut it).

    res = evaluate_models(["runs/a/final"], "data/stdlib", [128, 256, 512, 1024])
    res = evaluate_models(paths, data, lengths, context=ContextSettings(metrics=("recall",), seed=1))

Output (JSON): {"data", "tokens", "lengths", "document_masking",
                "models": {label: {"128": {"loss", "ppl", "windows", "beyond_trained"}, ...}},
                "context": {"settings": ContextSettings as a dict, "eos_token_id": int | None,
                            "models": {label: {"128": {...}, ...}}}}
where a context row (per model and length) is
    {"position": [bucket], "doc_position": [bucket] (only with EOS boundaries in the tokens),
     "recall": {"buckets": [bucket + "acc"], "hits", "hit_loss", "hit_acc", "nonhits", "nonhit_loss", "nonhit_acc"},
     "passkey": {"depths": [{"depth", "key_logprob", "accuracy", "win_rate", "distance"}], "key_logprob",
                 "accuracy", "win_rate"},
     "copy": [{"d", "pairs", "loss_first", "loss_second", "score"}, ...]}
a bucket being {"lo", "hi", "count", "loss"} over [lo, hi) (see `gl_ray.context`); losses in nats, log-likelihoods
per key token, distances in tokens. `gl_ray.context.headlines` reads the numbers `gl-ray report` shows.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from gl_ray import context as cx
from gl_ray.data.stream import TokenStream, check_document_ends
from gl_ray.devices import autocast_for, pick_device
from gl_ray.errors import UserError
from gl_ray.model import window_forward

CONTEXT_METRICS = ("position", "recall", "passkey", "copy")


MAX_PROBES = 1000  # trials, keys or distractors per setting: far beyond a useful eval, short of a runaway one


@dataclass(frozen=True)
class ContextSettings:
    """What the context-use metrics measure and with how many probes (the same for every model)."""

    metrics: tuple[str, ...] = CONTEXT_METRICS  # any of CONTEXT_METRICS; () for loss and perplexity only
    passkey_depths: tuple[float, ...] = (0.1, 0.5, 0.9)  # where the needle goes, as a fraction of the window
    passkey_trials: int = 4  # trials (a window of text, a key, its distractors) per depth and length
    passkey_tokens: int = 4  # tokens in a key
    cue_tokens: int = 4  # tokens in the fixed cue before the key (drawn once from the seed)
    distractors: int = 7  # random keys the true key is ranked against (accuracy's chance: 1 / (distractors + 1))
    copy_trials: int = 2  # windows per copy length d and length (short d: several pairs per window)
    copy_lengths: tuple[int, ...] = ()  # d values; () = 2, 4, ..., L/2 at each length L
    seed: int = 0  # keys, cue, copy tokens and probe text offsets

    def check(self, lengths: list[int]) -> None:
        """UserError naming the flag for settings that cannot run at these lengths."""
        bad = [m for m in self.metrics if m not in CONTEXT_METRICS]
        if bad:
            raise UserError(f"--metrics {','.join(bad)}: expected a comma-separated subset of "
                            f"{','.join(CONTEXT_METRICS)} (or none)")
        for flag, v in (("--passkey-trials", self.passkey_trials), ("--passkey-tokens", self.passkey_tokens),
                        ("--cue-tokens", self.cue_tokens), ("--distractors", self.distractors),
                        ("--copy-trials", self.copy_trials)):
            if not 1 <= v <= MAX_PROBES:  # each is a loop of forward passes: a typo must not run for hours
                raise UserError(f"{flag} {v} must be between 1 and {MAX_PROBES}")
        if self.seed < 0:
            raise UserError(f"--context-seed {self.seed} must be >= 0")
        if "passkey" in self.metrics:
            outside = [d for d in self.passkey_depths if not 0 < d < 1]
            if outside or not self.passkey_depths:
                raise UserError(f"--passkey-depths {','.join(map(str, self.passkey_depths))}: each depth must lie "
                                "strictly between 0 and 1 (a fraction of the window)")
            need = 2 * (self.cue_tokens + self.passkey_tokens) + 2
            if min(lengths) < need:
                raise UserError(f"--lengths {min(lengths)} is too short for the passkey probe (two cue + key blocks "
                                f"and text need {need} tokens): drop passkey from --metrics or lower --passkey-tokens")
        if "copy" in self.metrics and self.copy_lengths:
            longest = max(lengths)
            for d in self.copy_lengths:
                if d < 2 or 2 * d > longest:
                    raise UserError(f"--copy-lengths {d}: a copy length must be at least 2 and both copies (2d "
                                    f"tokens) must fit in the longest --lengths window, {longest}")

    def copy_ds(self, length: int) -> list[int]:
        return [d for d in self.copy_lengths if 2 * d <= length] if self.copy_lengths else cx.copy_lengths(length)

    def to_json(self) -> dict:
        return asdict(self)


DEFAULT_CONTEXT = ContextSettings()
NO_CONTEXT = ContextSettings(metrics=())


def parse_metrics(text: str) -> tuple[str, ...]:
    """'position,recall' -> ('position', 'recall'); 'none' or '' -> ()."""
    return () if text.strip() in ("", "none") else tuple(m.strip() for m in text.split(",") if m.strip())


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


@dataclass
class WindowScores:
    """A model's outputs on rows [n, L]: `loss` as `gl_ray.model.lm_loss` averages it (per-batch means weighted by
    rows, the eval's headline loss), and per target (column t-1 = target t) its loss (nats), top-1 hit and
    whether it is scored (False at document starts under document masking); numpy [n, L-1] each."""

    loss: float
    losses: np.ndarray
    correct: np.ndarray
    valid: np.ndarray


class TokenScorer:
    """Runs a causal LM over rows of tokens in batches of about `batch_tokens` tokens. The model is called as
    `lm_loss` calls it (Hugging Face keywords; anything returning `.logits` [b, L, vocab] and, given labels,
    `.loss` or None works, e.g. a test model)."""

    def __init__(self, model, device: torch.device, batch_tokens: int = 16384):
        self.model, self.device, self.batch_tokens = model, device, batch_tokens
        self.amp = autocast_for(device, "auto")

    @torch.no_grad()
    def score(self, rows: np.ndarray, eos_id: int | None = None, *, positions: np.ndarray | None = None,
              mask: np.ndarray | None = None) -> WindowScores:
        """Scores of rows int [n, L]; with `eos_id` attention stays within each document (document masking);
        with `positions` [L] and `mask` bool [L, L] (query, key) every row gets those instead (packed probes)."""
        n, L = rows.shape
        mb = max(1, self.batch_tokens // L)
        total, losses, correct, valid = 0.0, [], [], []
        for i in range(0, n, mb):
            x = torch.from_numpy(np.ascontiguousarray(rows[i: i + mb], dtype=np.int64)).to(self.device)
            with self.amp():
                if mask is None:
                    out, scored = window_forward(self.model, x, eos_id=eos_id)
                else:
                    out, scored = self._forward_masked(x, positions, mask)
            logits = out.logits[:, :-1].float()  # [b, L-1, vocab]: column t-1 predicts target t
            target = x[:, 1:]
            tok_loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten(),
                                                         reduction="none").view_as(target)
            batch_loss = out.loss if getattr(out, "loss", None) is not None else tok_loss[scored].mean()
            total += float(batch_loss) * len(x)
            losses.append(tok_loss.cpu().numpy())
            correct.append((logits.argmax(-1) == target).cpu().numpy())
            valid.append(scored.cpu().numpy())
        return WindowScores(total / n, np.concatenate(losses), np.concatenate(correct), np.concatenate(valid))

    def _forward_masked(self, x: torch.Tensor, positions: np.ndarray, mask: np.ndarray):
        """The model's output with given positions and a [q, kv] boolean mask (True: attend) for every row."""
        pos = torch.from_numpy(positions).to(self.device).expand(len(x), -1)
        allowed = torch.from_numpy(mask).to(self.device)[None, None]  # [1, 1, q, kv], as document_mask builds it
        out = self.model(input_ids=x, position_ids=pos, attention_mask=allowed, use_cache=False)
        return out, torch.ones_like(x[:, 1:], dtype=torch.bool)


@dataclass(frozen=True)
class Probes:
    """The probe windows of every length, built once and shared by every model."""

    passkey: dict[int, list[cx.PasskeyProbe]]  # length -> one probe per depth
    copy: dict[int, dict[int, np.ndarray]]  # length -> d -> rows [copy_trials, L]

    @classmethod
    def build(cls, tokens: np.ndarray, eos_id: int | None, lengths: list[int], settings: ContextSettings) -> Probes:
        filler = cx.filler_text(tokens, eos_id)
        pool = cx.token_pool(filler)
        s = settings
        cue = np.random.default_rng([s.seed, 0xC0E]).choice(pool, size=s.cue_tokens)
        passkey = {L: [cx.passkey_windows(filler, pool, length=L, depth=depth, trials=s.passkey_trials,
                                          key_tokens=s.passkey_tokens, distractors=s.distractors, cue=cue,
                                          seed=(s.seed, L, i))
                       for i, depth in enumerate(s.passkey_depths)]
                   for L in lengths} if "passkey" in s.metrics else {}
        copy = {L: {d: cx.copy_windows(filler, pool, length=L, d=d, trials=s.copy_trials, seed=(s.seed, L, d))
                    for d in s.copy_ds(L)}
                for L in lengths} if "copy" in s.metrics else {}
        return cls(passkey=passkey, copy=copy)


def context_row(scorer: TokenScorer, rows: np.ndarray, scores: WindowScores, *, eos_id: int | None,
                masked: bool, probes: Probes, settings: ContextSettings) -> dict:
    """The context-use metrics of one model at one length. rows [n, L]: the val windows `scores` came from;
    eos_id: the dataset's EOS (document boundaries; None if the tokens hold none); masked: document masking."""
    L = rows.shape[1]
    out: dict = {}
    m = settings.metrics
    if "position" in m:
        out["position"] = cx.position_loss(scores.losses, scores.valid, length=L)
        if eos_id is not None:
            doc_pos = cx.document_positions(rows, eos_id)[:, 1:]
            out["doc_position"] = cx.position_loss(scores.losses, scores.valid, length=L, positions=doc_pos)
    if "recall" in m:
        hit, dist = cx.recall_targets(rows, eos_id if masked else None)
        out["recall"] = cx.recall_by_distance(scores.losses, scores.correct, scores.valid & hit, dist,
                                              scores.valid & ~hit, length=L)
    if "passkey" in m:
        depths = []
        for depth, probe in zip(settings.passkey_depths, probes.passkey[L]):
            losses = scorer.score(probe.rows, positions=probe.positions, mask=probe.mask).losses
            depths.append({"depth": depth, **cx.passkey_scores(losses, probe)})
        out["passkey"] = {"depths": depths, "key_logprob": float(np.mean([d["key_logprob"] for d in depths])),
                          "accuracy": float(np.mean([d["accuracy"] for d in depths])),
                          "win_rate": float(np.mean([d["win_rate"] for d in depths]))}
    if "copy" in m:
        out["copy"] = [cx.copy_scores(scorer.score(r).losses, d) for d, r in probes.copy[L].items()]
    return out


def evaluate_models(models: list[str], data: str, lengths: list[int], *, max_tokens: int = 262144,
                    batch_tokens: int = 16384, device: str = "auto", document_masking: bool = False,
                    context: ContextSettings = DEFAULT_CONTEXT, progress=print) -> dict:
    """Loss and perplexity of each model at each length on the same val tokens, and the context-use metrics
    `context.metrics`; progress(line) after each model and length."""
    if not lengths or any(L <= 1 for L in lengths):
        raise UserError(f"--lengths {lengths} must be lengths > 1")
    if max_tokens <= 0:
        raise UserError(f"--max-tokens {max_tokens} must be positive")
    lengths = sorted(set(lengths))
    context.check(lengths)
    dev = pick_device(device)
    val = TokenStream(data, "val")
    longest = max(lengths)
    usable = min(max_tokens, val.tokens) // longest * longest
    if usable == 0 and val.tokens >= longest:  # the val split has a window: the flag is what is short
        raise UserError(f"--max-tokens {max_tokens} is shorter than one window of the longest --lengths, {longest}: "
                        f"pass at least {longest}")
    if usable == 0:
        raise UserError(f"--lengths {longest} is longer than the val split of {data!r} ({val.tokens} tokens): "
                        "pass shorter --lengths or prepare more val data")
    if document_masking:
        check_document_ends(val)
    eos_id = val.manifest.eos_token_id if document_masking else None
    tokens = np.asarray(val.read(0, usable))
    boundaries = val.manifest.eos_token_id if (tokens == val.manifest.eos_token_id).any() else None
    probes = Probes.build(tokens, val.manifest.eos_token_id, lengths, context) if context.metrics else None
    out: dict = {"data": data, "tokens": usable, "lengths": lengths, "document_masking": document_masking,
                 "models": {}}
    if context.metrics:
        out["context"] = {"settings": context.to_json(), "eos_token_id": boundaries, "models": {}}
    t0 = time.perf_counter()
    for i, path in enumerate(models):
        model = load_model(path, dev)
        if model.config.vocab_size < val.manifest.vocab_size:
            raise UserError(f"model {path!r} has vocab {model.config.vocab_size}, smaller than the dataset's "
                            f"{val.manifest.vocab_size}: it was trained on another tokenizer")
        scorer = TokenScorer(model, dev, batch_tokens)
        label, rows_out, ctx_out = model_label(path), {}, {}
        for L in lengths:
            rows = tokens[: len(tokens) // L * L].reshape(-1, L)  # the same tokens, cut at L
            scores = scorer.score(rows, eos_id)
            loss = scores.loss
            rows_out[str(L)] = {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "windows": len(rows),
                                "beyond_trained": L > _trained_len(path)}
            line = f"[eval] model {i + 1}/{len(models)} {label} L={L}: loss {loss:.4f}"
            if context.metrics:
                ctx_out[str(L)] = context_row(scorer, rows, scores, eos_id=boundaries, masked=document_masking,
                                              probes=probes, settings=context)
                line += _headline_text(cx.headlines(ctx_out[str(L)]))
            progress(f"{line} ({time.perf_counter() - t0:.0f} s so far)")
        out["models"][label] = rows_out
        if context.metrics:
            out["context"]["models"][label] = ctx_out
    return out


def _headline_text(h: dict) -> str:
    parts = []
    if h["recall_acc_far"] is not None:
        parts.append(f"recall acc {h['recall_acc_far']:.3f} at distance {h['recall_far_bucket'][0]}+")
    if h["passkey_acc"] is not None:
        parts.append(f"passkey acc {h['passkey_acc']:.2f}")
    if h["copy_score"] is not None:
        parts.append(f"copy score {h['copy_score']:.2f} at d={h['copy_d']}")
    return ", " + ", ".join(parts) if parts else ""


def _trained_len(path: str) -> int:
    """The last stage length of the run that produced a final/ folder (from its plan.json), else max positions."""
    plan = Path(path).parent / "plan.json"
    if plan.is_file():
        return json.loads(plan.read_text())["stages"][-1]["seq_len"]
    cfg = json.loads((Path(path) / "config.json").read_text())
    return int(cfg.get("max_position_embeddings", 0))


def model_label(path: str) -> str:
    p = Path(path).resolve()
    return p.parent.name if p.name == "final" else p.name


def read_eval(path: str) -> dict:
    """An eval JSON written by `gl-ray eval` or `reproduce` (the one reader of the format)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--eval {path!r}: no such file; write one with `gl-ray eval --out {path}`")
    try:
        res = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"--eval {path!r} is not valid JSON") from None
    if not isinstance(res, dict) or not isinstance(res.get("models"), dict) or "lengths" not in res:
        raise UserError(f"--eval {path!r} is not a `gl-ray eval` result (no models and lengths)")
    return res


def format_eval(res: dict) -> str:
    lengths = res["lengths"]
    rows = ["| model | " + " | ".join(f"ppl@{L}" for L in lengths) + " |",
            "| --- | " + " | ".join("---" for _ in lengths) + " |"]
    for name, r in res["models"].items():
        cells = [f"{r[str(L)]['ppl']:.2f}" + ("*" if r[str(L)]["beyond_trained"] else "") for L in lengths]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    rows.append(f"\n{res['tokens']:,} val tokens at every length; * = longer than the model's last training length")
    if res.get("context"):
        rows += ["", "| model | length | recall acc (farthest bucket) | passkey acc | copy score (d) |",
                 "| --- | --- | --- | --- | --- |"]
        for name, by_len in res["context"]["models"].items():
            for L in lengths:
                h = cx.headlines(by_len[str(L)])
                far = "-" if h["recall_acc_far"] is None else \
                    f"{h['recall_acc_far']:.3f} ({h['recall_far_bucket'][0]}-{h['recall_far_bucket'][1] - 1})"
                pk = "-" if h["passkey_acc"] is None else f"{h['passkey_acc']:.2f}"
                cp = "-" if h["copy_score"] is None else f"{h['copy_score']:.2f} ({h['copy_d']})"
                rows.append(f"| {name} | {L} | {far} | {pk} | {cp} |")
        s = res["context"]["settings"]
        rows.append(f"\npasskey chance {1 / (s['distractors'] + 1):.2f} ({s['distractors']} distractors); "
                    "copy score = loss on the first copy - loss on the second (nats)")
    return "\n".join(rows)
