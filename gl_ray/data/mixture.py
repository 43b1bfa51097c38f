"""Training mixtures: data.sources (prepared datasets of one tokenizer, each with a weight in tokens) and
data.stage_weights (one weight per source per stage), or data.long_doc_boost (data.path's long documents drawn
more often in some stages), read with no copy of the corpora.

    mix = mixture_for(cfg.data, plan)            # None without data.sources or data.long_doc_boost
    src, starts = mix.assign(1, np.arange(8))     # stage 1's first 8 rows: their source and stream offset
    rows = mixture_rows(mix, RowLayout.of(plan.stages[1], rank=0, start_step=0), np.arange(8))  # int32 [8, L]
    for rows in mixture_steps(mix, layout): ...   # the Ray-free twin of pipeline.stage_dataset(mixture=mix)

Assignment rule: a stage's rows are numbered in step order over all workers (`RowLayout.global_rows`: the same
whatever the world size). Row g of stage k goes to source order_k[g % P_k], where order_k is one period of smooth
weighted round-robin over the stage's integer weights (`integer_weights`; P_k their sum): over every prefix of a
stage each source's row count is within one row of its share, and a stage's rows all have its length, so the
shares are shares of tokens.
Cursor rule: each source is one token stream (its train split, epoch after epoch, `stream.TokenStream`). Source
i's r-th row of stage k starts at cursor_k[i] + r * seq_len_k, where cursor_k[i] is every token it gave to the
stages before k (their planned rows). So rows are a pure function of (stage, row), and a resume is exact.
Epoch rule: past its corpus a source's stream goes on into its next epoch (TokenStream's shuffled epochs, seeded by
data.seed); `accounting` says in which stage that starts, and plan.json records it.
Length-aware upsampling (data.long_doc_boost: one factor b_k per stage; data.long_doc_min: from which length a
document is long, default the final stage length): data.path (or each source of data.sources) becomes two sources,
"NAME:long" and "NAME:short", each the TokenStream of its documents only (`TokenStream(doc_filter=...)`), that
share its weight in stage k so that its long documents give b_k * L / (b_k * L + S) of its tokens (L, S: their
train tokens; `long_doc_weights`). The sources' own shares stay as weighted (per-source length upsampling, Fu et
al. 2024); a source whose documents are all long or all short is drawn whole. The rules above hold unchanged; the
validation split stays natural.

plan.json with data.sources (`accounting`, `plan_mixture`):
    "sources": [{"name", "path", "corpus_tokens", "drawn_tokens", "epochs" (drawn / corpus), "epoch_starts":
                 [{"epoch": 2, "stage": k}, ...], "doc_tokens": [lo, hi] (long_doc_boost: its documents' lengths,
                 lo <= length < hi, hi null: no bound)}, ...]
    "data": [{"stage", "seq_len", "weights": [int per source], "tokens": {name: int},
              "stream": {name: [start, stop]}, "epochs": {name: [first, last]} (0-based)}, ...]
Reports (metrics.jsonl) carry `source_tokens` ({name: int}, cumulative trained tokens), summary.json the totals
and each stage's.
"""

from __future__ import annotations

import functools
import math
import posixpath
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from gl_ray import storage
from gl_ray.data.manifest import load_manifest
from gl_ray.data.packing import RowLayout
from gl_ray.data.stream import DocFilter, TokenStream, get_stream
from gl_ray.data.tokenizer import check_same_tokenizer
from gl_ray.errors import UserError
from gl_ray.schedule import Plan

MAX_PERIOD = 1 << 16  # rows of one round-robin period at most (finer weights are rounded to 1/MAX_PERIOD)
SHARE_DENOMINATOR = 10_000  # data.long_doc_boost: a stage's long share is rounded to a fraction of this at most


def integer_weights(weights: list[float]) -> tuple[int, ...]:
    """The smallest integers in the weights' ratios (as written: 0.7 and 0.3 give 7 and 3), a weight > 0 kept > 0."""
    fracs = [Fraction(repr(float(w))).limit_denominator(10_000) for w in weights]
    den = math.lcm(*(f.denominator for f in fracs))
    ints = [int(f * den) for f in fracs]
    g = math.gcd(*ints)
    ints = [i // g for i in ints]
    if sum(ints) > MAX_PERIOD:
        total = sum(weights)
        ints = [max(1, round(w / total * MAX_PERIOD)) if w > 0 else 0 for w in weights]
    return tuple(ints)


@functools.lru_cache(maxsize=64)
def period_order(weights: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """One period of smooth weighted round-robin over integer weights: (the source of each row, int64 [P]; rows of
    each source before each row and after the last, int64 [P + 1, sources]). Ties go to the lower index."""
    total = sum(weights)
    current = [0] * len(weights)
    order = np.empty(total, np.int64)
    for g in range(total):
        current = [c + w for c, w in zip(current, weights)]
        i = current.index(max(current))
        current[i] -= total
        order[g] = i
    before = np.zeros((total + 1, len(weights)), np.int64)
    before[1:] = np.cumsum(np.eye(len(weights), dtype=np.int64)[order], axis=0)
    return order, before


def source_counts(weights: tuple[int, ...], rows: int) -> np.ndarray:
    """Rows of each source among a stage's rows [0, rows): int64 [sources]."""
    order, before = period_order(weights)
    q, r = divmod(rows, len(order))
    return q * np.asarray(weights, np.int64) + before[r]


@dataclass(frozen=True, kw_only=True)
class Mixture:
    """A run's mixture, a pure function of data.sources, data.stage_weights and the plan (world-size free); or of
    data.long_doc_boost, the plan and data.path's document lengths."""

    paths: tuple[str, ...]
    names: tuple[str, ...]  # the sources' keys in plan.json, summary.json and reports (folder names)
    seed: int  # data.seed: each source's epoch order
    weights: tuple[tuple[int, ...], ...]  # per stage: integer weight of each source
    seq_lens: tuple[int, ...]  # per stage
    sequences_per_step: tuple[int, ...]  # per stage, all workers
    stage_rows: tuple[int, ...]  # per stage: planned rows (steps * sequences_per_step; time mode: an upper bound)
    cursors: tuple[tuple[int, ...], ...]  # per stage: each source's stream offset at the stage's start
    filters: tuple[DocFilter | None, ...]  # per source: the documents it holds (data.long_doc_boost), None: all

    def stream(self, i: int) -> TokenStream:
        """Source i's train stream (per-process cached)."""
        return get_stream(self.paths[i], "train", self.seed, self.filters[i])

    def assign(self, stage: int, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Stage rows (global, `RowLayout.global_rows`) -> (source of each, int64; stream offset of its first
        token in that source, int64)."""
        rows = np.asarray(rows, np.int64)
        order, before = period_order(self.weights[stage])
        r = rows % len(order)
        src = order[r]
        nth = rows // len(order) * np.asarray(self.weights[stage], np.int64)[src] + before[r, src]
        return src, np.asarray(self.cursors[stage], np.int64)[src] + nth * self.seq_lens[stage]

    def stage_tokens(self, stage: int) -> list[int]:
        """Tokens each source gives the whole (planned) stage."""
        counts = source_counts(self.weights[stage], self.stage_rows[stage])
        return [int(c) * self.seq_lens[stage] for c in counts]

    def drawn(self, steps: dict[int, int]) -> list[int]:
        """Tokens each source gives the first steps[k] optimizer steps of each stage k (all workers)."""
        out = np.zeros(len(self.paths), np.int64)
        for k, n in steps.items():
            out += source_counts(self.weights[k], n * self.sequences_per_step[k]) * self.seq_lens[k]
        return [int(t) for t in out]

    def step_tokens(self, stage: int, step: int) -> list[int]:
        """Tokens each source gives stage-local optimizer step `step` (all workers)."""
        n, w = self.sequences_per_step[stage], self.weights[stage]
        counts = source_counts(w, (step + 1) * n) - source_counts(w, step * n)
        return [int(c) * self.seq_lens[stage] for c in counts]


def source_names(paths: list[str]) -> tuple[str, ...]:
    """Folder names, made unique with #index where two are the same."""
    base = [posixpath.basename(p.rstrip("/")) or p for p in paths]
    return tuple(b if base.count(b) == 1 else f"{b}#{i}" for i, b in enumerate(base))


def mixture_for(data, plan: Plan) -> Mixture | None:
    """The mixture of a DataConfig (None without data.sources or data.long_doc_boost) under a plan; UserError
    unless data.stage_weights (data.long_doc_boost) has one row (factor) per stage. data.long_doc_boost reads
    each source's document lengths (`boosted_mixture`)."""
    if not data.sources and not data.long_doc_boost:
        return None
    paths = [s.path for s in data.sources] or [data.path]
    rows = data.stage_weights or [[s.weight for s in data.sources] or [1]] * len(plan.stages)
    if len(rows) != len(plan.stages):
        raise UserError(f"data.stage_weights has {len(rows)} rows for {len(plan.stages)} stages "
                        f"({', '.join(str(st.seq_len) for st in plan.stages)}): give one list of weights per stage")
    if data.long_doc_boost:
        return boosted_mixture(data, plan, paths, rows)
    return build_mixture(paths=paths, names=list(source_names(paths)), filters=[None] * len(paths), rows=rows,
                         seed=data.seed, plan=plan)


def boosted_mixture(data, plan: Plan, paths: list[str], rows: list[list[float]]) -> Mixture:
    """data.long_doc_boost: each source that has both long and short train documents becomes two, "NAME:long" and
    "NAME:short", that share its weight in stage k as b_k * L : S (`long_doc_weights`), so the mix of sources stays
    as weighted and only the documents within each change (Fu et al. 2024's per-source length upsampling). A
    source with documents of one kind only is drawn whole. UserError unless the boost has one factor per stage and
    some source has both kinds."""
    boost, stages = data.long_doc_boost, plan.stages
    if len(boost) != len(stages):
        raise UserError(f"data.long_doc_boost has {len(boost)} factors for {len(stages)} stages "
                        f"({', '.join(str(st.seq_len) for st in stages)}): give one factor per stage")
    long_min = data.long_doc_min or plan.final_len
    what = f"data.long_doc_min={long_min}" + ("" if data.long_doc_min else " (the final stage length)")
    parts = []  # (path, name, doc filter, weight per stage) of each source of the mixture
    for i, (path, name) in enumerate(zip(paths, source_names(paths))):
        weights = [row[i] for row in rows]
        long_tokens, short_tokens = long_doc_split(path, data.seed, long_min, what, alone=len(paths) == 1)
        if not (long_tokens and short_tokens):
            parts.append((path, name, None, weights))
            continue
        shares = long_doc_weights(boost, long_tokens, short_tokens)
        parts += [(path, f"{name}:long", (long_min, None), [w * a / (a + b) for w, (a, b) in zip(weights, shares)]),
                  (path, f"{name}:short", (0, long_min), [w * b / (a + b) for w, (a, b) in zip(weights, shares)])]
    if len(parts) == len(paths):
        raise UserError(f"{what}: no source of data.sources has both documents that long and shorter ones, so there "
                        "is nothing to boost; set data.long_doc_min between a source's shortest and longest document")
    out_paths, names, filters, columns = zip(*parts)
    return build_mixture(paths=list(out_paths), names=list(names), filters=list(filters),
                         rows=[list(r) for r in zip(*columns)], seed=data.seed, plan=plan)


def build_mixture(*, paths: list[str], names: list[str], filters: list, rows: list[list[float]], seed: int,
                  plan: Plan) -> Mixture:
    """The Mixture of sources weighted per stage by `rows` (one list of weights per stage): each stage's
    integer weights and each source's cursor at each stage's start."""
    weights = tuple(integer_weights(r) for r in rows)
    cursor, cursors = np.zeros(len(paths), np.int64), []
    for st, w in zip(plan.stages, weights):
        cursors.append(tuple(int(c) for c in cursor))
        cursor = cursor + source_counts(w, st.steps * st.sequences_per_step) * st.seq_len
    return Mixture(paths=tuple(paths), names=tuple(names), seed=seed, weights=weights,
                   seq_lens=tuple(st.seq_len for st in plan.stages),
                   sequences_per_step=tuple(st.sequences_per_step for st in plan.stages),
                   stage_rows=tuple(st.steps * st.sequences_per_step for st in plan.stages), cursors=tuple(cursors),
                   filters=tuple(filters))


def long_doc_weights(boost: list[float], long_tokens: int, short_tokens: int) -> list[list[int]]:
    """data.long_doc_boost: each stage's [long, short] integer weights. The long documents' share of stage k's
    tokens is b_k * L / (b_k * L + S) (L, S: the corpus's long and short train tokens; b_k 1: the natural
    share), as the nearest fraction of denominator <= SHARE_DENOMINATOR (its numerator and the rest)."""
    out = []
    for b in boost:
        share = Fraction(b) * long_tokens / (Fraction(b) * long_tokens + short_tokens)
        share = share.limit_denominator(SHARE_DENOMINATOR)
        out.append([share.numerator, share.denominator - share.numerator])
    return out


def long_doc_split(path: str, seed: int, long_min: int, what: str, *, alone: bool) -> tuple[int, int]:
    """data.long_doc_boost: (the train tokens of `path`'s documents of at least long_min tokens, of the shorter
    ones). alone (data.path without data.sources): UserError, starting with `what`, unless it has both kinds; in a
    mixture a source of one kind is drawn whole."""
    lengths = get_stream(path, "train", seed).doc_lengths
    long_tokens = int(lengths[lengths >= long_min].sum())
    short_tokens = int(lengths.sum()) - long_tokens
    if not alone or (long_tokens and short_tokens):
        return long_tokens, short_tokens
    if not long_tokens:
        raise UserError(f"{what}: no train document of {path!r} is that long (the longest has "
                        f"{int(lengths.max()):,} tokens), so there is nothing to boost; set data.long_doc_min "
                        "at most that")
    raise UserError(f"{what}: every train document of {path!r} is that long (the shortest has "
                    f"{int(lengths.min()):,} tokens, the longest {int(lengths.max()):,}), so there is nothing to "
                    "boost; set data.long_doc_min above the shortest")


def mixture_rows(mix: Mixture, layout: RowLayout, local_rows: np.ndarray) -> np.ndarray:
    """The one mapping both paths use: a worker's local rows of a stage -> packed rows, int32 [n, seq_len]."""
    src, starts = mix.assign(layout.stage, layout.global_rows(np.asarray(local_rows, np.int64)))
    out = np.empty((len(src), layout.seq_len), np.int32)
    for i in np.unique(src):
        pick = src == i
        out[pick] = mix.stream(i).rows(starts[pick], layout.seq_len)
    return out


def mixture_steps(mix: Mixture, layout: RowLayout) -> Iterator[np.ndarray]:
    """One worker's rows of a stage, a step at a time, without Ray (the twin of `stream.stage_steps`)."""
    n = layout.rows_per_rank_step
    for first in range(0, layout.num_rows, n):
        yield mixture_rows(mix, layout, np.arange(first, first + n))


def check_sources(data) -> None:
    """Every source is a prepared dataset (manifest and shards checked) tokenized as data.path; makes their paths
    absolute, as the driver does data.path's. UserError naming the first that is not."""
    ours = load_manifest(data.path)
    ours_json = storage.read_bytes(storage.join(ours.tokenizer_uri, "tokenizer.json"))
    for i, s in enumerate(data.sources):
        s.path = storage.absolute(s.path)
        what = f"data.sources[{i}] {s.path!r}"
        if not storage.exists(storage.join(s.path, "manifest.json")):
            raise UserError(f"{what}: no dataset there (manifest.json missing); run `gl-ray prepare --out {s.path} "
                            f"--tokenizer {storage.join(data.path, 'tokenizer')}`")
        theirs = load_manifest(s.path)
        theirs_json = storage.read_bytes(storage.join(theirs.tokenizer_uri, "tokenizer.json"))
        if theirs_json != ours_json or theirs.eos_token_id != ours.eos_token_id:
            with tempfile.TemporaryDirectory() as tmp:
                Path(tmp, "tokenizer.json").write_bytes(theirs_json)
                check_same_tokenizer(ours_json.decode(), tmp, what=what)
            if theirs.eos_token_id != ours.eos_token_id or theirs.vocab_size != ours.vocab_size:
                raise UserError(f"{what} has eos id {theirs.eos_token_id} and vocab {theirs.vocab_size}, data.path's "
                                f"{ours.eos_token_id} and {ours.vocab_size}: prepare it with data.path's tokenizer")


def accounting(mix: Mixture, corpus_tokens: list[int]) -> dict:
    """plan.json's `mixture` (see the module docstring); corpus_tokens: each source's train tokens."""
    stages, drawn = [], [0] * len(mix.paths)
    starts: list[list[dict]] = [[] for _ in mix.paths]
    for k in range(len(mix.seq_lens)):
        tokens = mix.stage_tokens(k)
        span = {n: [mix.cursors[k][i], mix.cursors[k][i] + tokens[i]] for i, n in enumerate(mix.names)}
        epochs = {n: [a // corpus_tokens[i], max(a, b - 1) // corpus_tokens[i]]
                  for i, (n, (a, b)) in enumerate(span.items())}
        for i, n in enumerate(mix.names):
            first = (starts[i][-1]["epoch"] if starts[i] else 1)
            starts[i] += [{"epoch": e + 1, "stage": k} for e in range(first, epochs[n][1] + 1) if tokens[i]]
            drawn[i] += tokens[i]
        stages.append({"stage": k, "seq_len": mix.seq_lens[k], "weights": list(mix.weights[k]),
                       "tokens": dict(zip(mix.names, tokens)), "stream": span, "epochs": epochs})
    sources = [{"name": n, "path": p, "corpus_tokens": c, "drawn_tokens": d, "epochs": round(d / c, 4),
                "epoch_starts": s} | ({"doc_tokens": list(f)} if f else {})
               for n, p, c, d, s, f in zip(mix.names, mix.paths, corpus_tokens, drawn, starts, mix.filters)]
    return {"sources": sources, "stages": stages}


def corpus_tokens(mix: Mixture) -> list[int]:
    """Each source's train tokens (from its manifest; a selection of documents: from their lengths)."""
    return [mix.stream(i).tokens if f else load_manifest(p).tokens("train")
            for i, (p, f) in enumerate(zip(mix.paths, mix.filters))]


def format_mixture(acc: dict) -> str:
    """The mix per stage (tokens and share of each source), then a line per source that starts another epoch."""
    names = [s["name"] for s in acc["sources"]]
    width = max(14, *(len(n) + 1 for n in names))
    rows = [f"{'stage':>5} {'seq_len':>7} " + " ".join(f"{n:>{width}}" for n in names)]
    for st in acc["stages"]:
        total = max(1, sum(st["tokens"].values()))
        cells = [f"{st['tokens'][n]:,} ({100 * st['tokens'][n] / total:.0f}%)" for n in names]
        rows.append(f"{st['stage']:>5} {st['seq_len']:>7} " + " ".join(f"{c:>{width}}" for c in cells))
    for i, s in enumerate(acc["sources"]):
        what = f"{s['name']!r} ({doc_range(s['doc_tokens'])})" if "doc_tokens" in s else \
            f"data.sources[{i}] {s['name']!r}"
        for e in s["epoch_starts"]:
            rows.append(f"{what}: epoch {e['epoch']} starts in stage {e['stage']} "
                        f"({s['drawn_tokens']:,} tokens drawn from {s['corpus_tokens']:,}: {s['epochs']:g} epochs)")
    return "mixture (train tokens per source):\n" + "\n".join(rows)


def doc_range(doc_tokens: list) -> str:
    """A source's documents in words: "documents of >= 1,024 tokens", "documents of < 1,024 tokens"."""
    lo, hi = doc_tokens
    if hi is None:
        return f"documents of >= {lo:,} tokens"
    return f"documents of < {hi:,} tokens" if lo == 0 else f"documents of {lo:,} to {hi - 1:,} tokens"


def plan_mixture(data, plan: Plan) -> tuple[dict, str]:
    """What plan.json (`data`: each stage's mix, `sources`: each source's totals and epochs) and the printed plan
    say of data.sources or data.long_doc_boost; ({}, "") without them."""
    mix = mixture_for(data, plan)
    if mix is None:
        return {}, ""
    acc = accounting(mix, corpus_tokens(mix))
    text = format_mixture(acc)
    if data.long_doc_boost:
        boost, lines, srcs = ", ".join(f"{b:g}" for b in data.long_doc_boost), [], acc["sources"]
        long_min = next(f[0] for f in mix.filters if f and f[1] is None)
        for s, after in zip(srcs, [*srcs[1:], None]):
            if "doc_tokens" not in s:
                lines.append(f"data.long_doc_boost {boost}: {s['name']!r} has documents of one kind only "
                             f"(long: {long_min:,} tokens or more): drawn whole, not boosted")
            elif s["doc_tokens"][1] is None:
                share = s["corpus_tokens"] / (s["corpus_tokens"] + after["corpus_tokens"])
                lines.append(f"data.long_doc_boost {boost}: {s['name']!r} holds the {doc_range(s['doc_tokens'])}, "
                             f"{share:.1%} of the train tokens")
        text = "\n".join([*lines, text])
    return {"data": acc["stages"], "sources": acc["sources"]}, text
