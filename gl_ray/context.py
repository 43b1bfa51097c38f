"""Context-use metrics of `gl-ray eval`: pure functions of token ids and per-token losses (numpy, no model, no
files). `gl_ray.evaluate` runs the model and hands these functions its outputs.

Conventions. A window is `L` tokens x[0..L-1]; its targets are x[1..L-1], target t predicted from x[0..t-1].
Per-token arrays of a batch of windows are [windows, L - 1], column t - 1 holding target t:
`losses` (next-token cross-entropy, nats), `correct` (top-1 prediction == target), `valid` (the target is
scored: False only at document starts under document masking).

    pos = position_loss(losses, valid, length=L)                        # by position t of the target
    hit, dist = recall_targets(tokens)                                  # Zoology's associative-recall hits
    rec = recall_by_distance(losses, correct, valid & hit, dist, valid & ~hit, length=L)
    probe = passkey_windows(filler, pool, length=L, depth=0.5, trials=4, key_tokens=4, distractors=7,
                            cue=cue, seed=(0, L, 0))                    # 8 candidate windows per trial, packed
    scores = passkey_scores(losses_of(probe.rows, probe.positions, probe.mask), probe)  # key likelihood, rank
    rows = copy_windows(filler, pool, length=L, d=64, trials=4, seed=(0, L, 64))
    copy = copy_scores(losses_of(rows), d=64)                           # loss on copy 1 vs copy 2

Buckets are log2: [1,2), [2,4), ..., [2^k, min(2^(k+1), limit)); every bucket is listed, empty ones with
count 0 and None means, so that curves of different models line up.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def log2_buckets(limit: int) -> list[tuple[int, int]]:
    """[lo, hi) edges covering 1 .. limit - 1: [1,2), [2,4), ..., the last one cut at limit."""
    out, lo = [], 1
    while lo < limit:
        out.append((lo, min(2 * lo, limit)))
        lo *= 2
    return out


def bucket_means(keys: np.ndarray, mask: np.ndarray, values: dict[str, np.ndarray], *, limit: int) -> list[dict]:
    """Per log2 bucket of `keys` (ints >= 1, < limit) over the entries where `mask` holds: count and the mean of
    each array in `values` (all arrays the same shape)."""
    k = np.asarray(keys)[mask].astype(np.int64)
    edges = log2_buckets(limit)
    if len(k) and (k.min() < 1 or k.max() >= limit):
        raise ValueError(f"keys must lie in [1, {limit})")
    idx = np.floor(np.log2(np.maximum(k, 1))).astype(np.int64)  # bucket index: floor(log2 key)
    counts = np.bincount(idx, minlength=len(edges))
    sums = {name: np.bincount(idx, weights=np.asarray(v, dtype=np.float64)[mask], minlength=len(edges))
            for name, v in values.items()}
    rows = []
    for b, (lo, hi) in enumerate(edges):
        row = {"lo": lo, "hi": hi, "count": int(counts[b])}
        for name, s in sums.items():
            row[name] = float(s[b] / counts[b]) if counts[b] else None
        rows.append(row)
    return rows


def target_positions(windows: int, length: int) -> np.ndarray:
    """Position of each target in its window: t for target x[t] (the tokens before it), int64 [windows, L-1]."""
    return np.broadcast_to(np.arange(1, length, dtype=np.int64), (windows, length - 1))


def document_positions(tokens: np.ndarray, eos_id: int) -> np.ndarray:
    """Position of each token within its document, int64 [windows, L]: 0 at column 0 and right after each EOS
    (the document starts `gl_ray.model.document_mask` uses)."""
    n, L = tokens.shape
    starts = np.zeros((n, L), dtype=bool)
    starts[:, 0] = True
    starts[:, 1:] = tokens[:, :-1] == eos_id
    idx = np.broadcast_to(np.arange(L, dtype=np.int64), (n, L))
    return idx - np.maximum.accumulate(np.where(starts, idx, 0), axis=1)


def position_loss(losses: np.ndarray, valid: np.ndarray, *, length: int,
                  positions: np.ndarray | None = None) -> list[dict]:
    """Mean loss of the targets by position in log2 buckets: by default t, the target's index in the window
    (1 .. L-1); with `positions` [windows, L-1] any other position (e.g. within the document), targets at
    position 0 left out. Count-weighted bucket means average back to the mean loss of the targets counted."""
    pos = target_positions(len(losses), length) if positions is None else positions
    return bucket_means(pos, valid & (pos >= 1), {"loss": losses}, limit=length)


def previous_occurrence(tokens: np.ndarray, groups: np.ndarray | None = None) -> np.ndarray:
    """For each token, the index of the nearest earlier equal token in its row (and in its group, e.g. its
    document, when `groups` [windows, L] is given), -1 if none; int64 [windows, L]. Vectorised: a stable sort
    by (group, token) puts equal tokens next to each other in index order."""
    n, L = tokens.shape
    key = tokens.astype(np.int64)
    if groups is not None:
        key = groups.astype(np.int64) * (int(key.max(initial=0)) + 1) + key
    order = np.argsort(key, axis=1, kind="stable")  # [n, L]
    sorted_key = np.take_along_axis(key, order, axis=1)
    same = sorted_key[:, 1:] == sorted_key[:, :-1]  # [n, L-1]: sorted neighbour is the same (group, token)
    prev_sorted = np.full((n, L), -1, dtype=np.int64)
    prev_sorted[:, 1:] = np.where(same, order[:, :-1], -1)
    prev = np.empty((n, L), dtype=np.int64)
    np.put_along_axis(prev, order, prev_sorted, axis=1)
    return prev


def recall_targets(tokens: np.ndarray, eos_id: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Associative-recall hits (Zoology, Arora et al. 2023, on real text): target t is a hit when x[t-1]
    occurred earlier in the window, nearest at j < t-1, and x[j+1] == x[t]; its distance is t-1-j.
    Returns hit bool [windows, L-1] and distance int64 [windows, L-1] (0 where there is no earlier occurrence).
    With `eos_id` (document masking) only occurrences in the target's own document count."""
    groups = None
    if eos_id is not None:  # document number of each token: what masked attention can see
        starts = np.zeros(tokens.shape, dtype=np.int64)
        starts[:, 1:] = tokens[:, :-1] == eos_id
        groups = np.cumsum(starts, axis=1)
    prev = previous_occurrence(tokens, groups)[:, :-1]  # [n, L-1]: nearest j for x[t-1], column t-1
    L = tokens.shape[1]
    t = np.arange(1, L, dtype=np.int64)
    seen = prev >= 0
    after = np.take_along_axis(tokens, np.where(seen, prev + 1, 0), axis=1)  # x[j+1]
    hit = seen & (after == tokens[:, 1:])
    distance = np.where(seen, (t - 1) - prev, 0)
    return hit, distance


def recall_by_distance(losses: np.ndarray, correct: np.ndarray, hits: np.ndarray, distance: np.ndarray,
                       nonhits: np.ndarray, *, length: int) -> dict:
    """Recall hits' mean loss and top-1 accuracy per log2 bucket of distance, overall, and the non-hits'.
    `hits`, `nonhits`: bool [windows, L-1] of the scored targets in each class."""
    acc = correct.astype(np.float64)
    return {"buckets": bucket_means(distance, hits, {"loss": losses, "acc": acc}, limit=length),
            "hits": int(hits.sum()), "hit_loss": _mean(losses, hits), "hit_acc": _mean(acc, hits),
            "nonhits": int(nonhits.sum()), "nonhit_loss": _mean(losses, nonhits), "nonhit_acc": _mean(acc, nonhits)}


def _mean(v: np.ndarray, mask: np.ndarray) -> float | None:
    return float(np.asarray(v, dtype=np.float64)[mask].mean()) if mask.any() else None


def filler_text(tokens: np.ndarray, eos_id: int | None) -> np.ndarray:
    """The val tokens with every EOS taken out: one long document to fill probe windows with."""
    return tokens if eos_id is None else tokens[tokens != eos_id]


def token_pool(filler: np.ndarray) -> np.ndarray:
    """The distinct token ids of the filler: random keys and copies draw from them (tokens the model has seen)."""
    return np.unique(filler)


def filler_slice(filler: np.ndarray, start: int, n: int) -> np.ndarray:
    """n filler tokens from `start`, wrapping around the filler."""
    return np.take(filler, np.arange(start, start + n) % len(filler)) if n else filler[:0]


def random_tokens(rng: np.random.Generator, pool: np.ndarray, n: int) -> np.ndarray:
    """n tokens drawn from pool, all different when the pool allows: a repeated token would make the copy
    ambiguous (which occurrence to continue from) for reasons that have nothing to do with distance."""
    return rng.choice(pool, size=n, replace=len(pool) < n)


@dataclass(frozen=True)
class PasskeyProbe:
    """The passkey windows of one depth, packed: a window is `text, cue, key, text, cue, candidate`, and the
    `candidates` windows of a trial differ only in the final key, so a trial is one row: the shared part up to
    the last cue token, then one branch per candidate (true key first), [last cue token, candidate key]. A branch
    attends the shared part and itself only and has the positions the same tokens have at the end of an ordinary
    window (`mask`, `positions`), so the row's per-token losses are those of the `candidates` windows."""

    rows: np.ndarray  # int64 [trials, n], n = shared + candidates * (key_tokens + 1)
    positions: np.ndarray  # int64 [n]: position of each token in the window it stands for
    mask: np.ndarray  # bool [n, n]: query i may attend key j
    candidates: int  # distractors + 1
    key_tokens: int
    length: int  # L, the window length
    key_start: int  # column of the needle's first key token

    @property
    def trials(self) -> int:
        return len(self.rows)

    def key_columns(self) -> np.ndarray:
        """Columns of each candidate's key tokens in the packed row, int64 [candidates, key_tokens]."""
        shared, branch = self.length - self.key_tokens - 1, self.key_tokens + 1
        return shared + branch * np.arange(self.candidates)[:, None] + 1 + np.arange(self.key_tokens)[None, :]

    def windows(self) -> np.ndarray:
        """The ordinary windows the rows stand for, int64 [trials * candidates, L] (trial-major)."""
        shared = self.length - self.key_tokens - 1
        keys = self.rows[:, self.key_columns()]  # [trials, candidates, key_tokens]
        head = np.repeat(self.rows[:, None, : shared + 1], self.candidates, axis=1)  # through the last cue token
        return np.concatenate([head, keys], axis=2).reshape(-1, self.length)


def branch_layout(shared: int, branch: int, branches: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions [n] and attention mask [n, n] of a row holding `shared` tokens then `branches` branches of
    `branch` tokens, each branch continuing the shared part on its own (causal within itself)."""
    n = shared + branch * branches
    idx = np.arange(n)
    group = np.where(idx < shared, -1, (idx - shared) // branch)  # -1: the shared part
    positions = np.where(idx < shared, idx, shared + (idx - shared) % branch)
    mask = (idx[None, :] <= idx[:, None]) & ((group[None, :] == -1) | (group[None, :] == group[:, None]))
    return positions.astype(np.int64), mask


def passkey_windows(filler: np.ndarray, pool: np.ndarray, *, length: int, depth: float, trials: int,
                    key_tokens: int, distractors: int, cue: np.ndarray, seed: tuple[int, ...]) -> PasskeyProbe:
    """A needle `cue + key` placed at `depth` (fraction of the window) of val text, and `cue + candidate` at the
    window's end, packed as PasskeyProbe describes. Trial k takes its text from filler[k * L:] and draws its key
    and distractor keys from `pool` with numpy's generator seeded by (*seed, k): the same for every model."""
    block = len(cue) + key_tokens
    hay_len = length - 2 * block
    if hay_len < 0 or len(cue) < 1:
        raise ValueError(f"a window of {length} tokens cannot hold two blocks of a cue and {key_tokens} key tokens")
    at = int(round(depth * hay_len))
    rows = []
    for k in range(trials):
        rng = np.random.default_rng([*seed, k])
        keys = np.stack([random_tokens(rng, pool, key_tokens) for _ in range(distractors + 1)])  # row 0: the key
        for i in range(1, distractors + 1):
            while np.array_equal(keys[i], keys[0]):  # a distractor equal to the key would rank as a tie
                keys[i] = random_tokens(rng, pool, key_tokens)
        hay = filler_slice(filler, k * length, hay_len)
        shared = np.concatenate([hay[:at], cue, keys[0], hay[at:], cue[:-1]])
        rows.append(np.concatenate([shared, *[np.concatenate([cue[-1:], key]) for key in keys]]))
    positions, mask = branch_layout(length - key_tokens - 1, key_tokens + 1, distractors + 1)
    return PasskeyProbe(rows=np.stack(rows).astype(np.int64), positions=positions, mask=mask,
                        candidates=distractors + 1, key_tokens=key_tokens, length=length, key_start=at + len(cue))


def passkey_scores(losses: np.ndarray, probe: PasskeyProbe) -> dict:
    """From per-token losses [trials, n-1] of a probe's packed rows: the true key's mean log-likelihood per token
    at the end (nats), `accuracy` (share of trials whose true key has a higher total log-likelihood than every
    distractor; chance 1 / candidates) and `win_rate` (share of true-vs-distractor pairs won, ties half;
    chance 0.5)."""
    ll = -losses[:, probe.key_columns() - 1].astype(np.float64).sum(axis=2)  # [trials, candidates]
    true, other = ll[:, :1], ll[:, 1:]
    return {"key_logprob": float(true.mean() / probe.key_tokens),
            "accuracy": float((true[:, 0] > other.max(axis=1)).mean()),
            "win_rate": float(((true > other) + 0.5 * (true == other)).mean()),
            "distance": probe.length - probe.key_tokens - probe.key_start}


def copy_pairs(length: int, d: int) -> int:
    """Copy pairs in a window: one, or for short d as many as fill the last quarter of the window (so every d is
    measured on about as many tokens, far into the window)."""
    return max(1, length // (8 * d))


def copy_windows(filler: np.ndarray, pool: np.ndarray, *, length: int, d: int, trials: int,
                 seed: tuple[int, ...]) -> np.ndarray:
    """Rows [trials, L]: val text, then `copy_pairs` pairs at the window's end, each d random tokens followed by
    the same d tokens again (all tokens of a window's pairs different where the pool allows). Trial k takes its
    text from filler[k * L:] and its tokens from a generator seeded by (*seed, k)."""
    if not 1 <= d <= length // 2:
        raise ValueError(f"copy length {d} must be in [1, {length // 2}]")
    pairs = copy_pairs(length, d)
    rows = []
    for k in range(trials):
        seqs = random_tokens(np.random.default_rng([*seed, k]), pool, pairs * d).reshape(pairs, d)
        region = np.concatenate([seqs, seqs], axis=1).reshape(-1)  # S1 S1 S2 S2 ...
        rows.append(np.concatenate([filler_slice(filler, k * length, length - len(region)), region]))
    return np.stack(rows).astype(np.int64)


def copy_scores(losses: np.ndarray, d: int) -> dict:
    """From per-token losses [trials, L-1] of copy_windows rows: mean loss on the first copies and on the second
    copies (tokens 2..d of each copy: the first token of a copy cannot be foreseen) and score = first - second
    (nats; a model that copies from d tokens back scores about the first copy's loss, one that cannot, 0)."""
    L = losses.shape[1] + 1
    pairs = copy_pairs(L, d)
    starts = L - 2 * d * pairs + 2 * d * np.arange(pairs)  # token index of each pair's first copy
    first = (starts[:, None] + np.arange(1, d)[None, :]).reshape(-1)  # targets t; their losses are column t - 1
    lf = float(losses[:, first - 1].astype(np.float64).mean())
    ls = float(losses[:, first + d - 1].astype(np.float64).mean())
    return {"d": d, "pairs": pairs, "loss_first": lf, "loss_second": ls, "score": lf - ls}


def copy_lengths(length: int) -> list[int]:
    """Default copy lengths at a window length: powers of two from 2 up to L/2 (both copies fit)."""
    out, d = [], 2
    while d <= length // 2:
        out.append(d)
        d *= 2
    return out


def headlines(row: dict) -> dict:
    """The eval's headline numbers at one length (a context row of the eval JSON): recall top-1 accuracy in
    the longest distance bucket that has hits, passkey accuracy over every depth, copy score at the longest d;
    None where the metric was not run."""
    out: dict = {"recall_acc_far": None, "recall_far_bucket": None, "passkey_acc": None, "copy_score": None,
                 "copy_d": None}
    buckets = [b for b in (row.get("recall") or {}).get("buckets", []) if b["count"]]
    if buckets:
        out["recall_acc_far"], out["recall_far_bucket"] = buckets[-1]["acc"], [buckets[-1]["lo"], buckets[-1]["hi"]]
    depths = (row.get("passkey") or {}).get("depths") or []
    if depths:
        out["passkey_acc"] = float(np.mean([p["accuracy"] for p in depths]))
    copies = row.get("copy") or []
    if copies:
        out["copy_score"], out["copy_d"] = copies[-1]["score"], copies[-1]["d"]
    return out
