"""gl_ray.context (the context-use metrics of `gl-ray eval`) on hand-made inputs, the eval wiring on a tiny model,
and the report's Welch's t-tests."""

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from gl_ray import context as cx
from gl_ray.evaluate import NO_CONTEXT, ContextSettings, TokenScorer, evaluate_models
from gl_ray.report import betainc, build_report, significance, t_p_value, welch_t


class InductionLM(torch.nn.Module):
    """A test LM that only copies: at position i it looks, among the tokens it may attend, for the nearest
    earlier j with x[j] == x[i] and position distance <= lookback, and predicts the token that follows j there
    (logit `confidence`, every other token 0); with no such j, uniform. lookback=None sees the whole window (a
    perfect copier). Takes Hugging Face's keywords: position_ids and a 4-D boolean attention_mask."""

    def __init__(self, vocab: int, lookback: int | None = None, confidence: float = 12.0):
        super().__init__()
        self.vocab, self.lookback, self.confidence = vocab, lookback, confidence

    def forward(self, input_ids, attention_mask=None, position_ids=None, **_):
        x = input_ids.cpu().numpy()
        b, n = x.shape
        reach = self.lookback or n
        logits = torch.zeros(b, n, self.vocab)
        if attention_mask is None or attention_mask.dim() != 4:  # causal: vectorised
            prev = cx.previous_occurrence(x)
            rows, i = np.nonzero((prev >= 0) & ((np.arange(n) - prev) <= reach))
            logits[rows, i, x[rows, prev[rows, i] + 1]] = self.confidence
            return SimpleNamespace(logits=logits, loss=None)
        allowed = np.broadcast_to(attention_mask[:, 0].cpu().numpy(), (b, n, n))
        pos = np.broadcast_to(position_ids.cpu().numpy(), (b, n))
        for r in range(b):
            for i in range(n):
                seen = np.nonzero(allowed[r, i])[0]  # what i attends, itself last
                seq, p = x[r, seen], pos[r, seen]
                earlier = np.nonzero((seq[:-1] == seq[-1]) & (p[-1] - p[:-1] <= reach))[0]
                if len(earlier):
                    logits[r, i, seq[earlier[-1] + 1]] = self.confidence
        return SimpleNamespace(logits=logits, loss=None)


def scorer(model) -> TokenScorer:
    return TokenScorer(model, torch.device("cpu"), batch_tokens=4096)


# --- pure metric math on hand-made inputs ---------------------------------------------------------------------

def test_log2_buckets_cover_every_position():
    assert cx.log2_buckets(8) == [(1, 2), (2, 4), (4, 8)]
    assert cx.log2_buckets(6) == [(1, 2), (2, 4), (4, 6)]
    assert cx.log2_buckets(2) == [(1, 2)]


def test_position_loss_buckets_by_target_index_and_average_back():
    L = 16
    losses = np.tile(np.arange(1, L, dtype=np.float32), (3, 1))  # the loss of target t is t
    rows = cx.position_loss(losses, np.ones_like(losses, dtype=bool), length=L)
    assert [(r["lo"], r["hi"], r["count"]) for r in rows] == [(1, 2, 3), (2, 4, 6), (4, 8, 12), (8, 16, 24)]
    assert [r["loss"] for r in rows] == [1.0, 2.5, 5.5, 11.5]
    rng = np.random.default_rng(0)
    losses = rng.exponential(size=(5, L - 1))
    rows = cx.position_loss(losses, np.ones_like(losses, dtype=bool), length=L)
    assert sum(r["loss"] * r["count"] for r in rows) / sum(r["count"] for r in rows) == pytest.approx(losses.mean())


def test_document_positions_restart_after_each_eos():
    tokens = np.array([[5, 6, 0, 7, 8, 9, 0, 4]])
    assert cx.document_positions(tokens, eos_id=0).tolist() == [[0, 1, 2, 0, 1, 2, 3, 0]]
    losses = np.arange(7, dtype=np.float64)[None]  # target t's loss: t - 1
    doc = cx.position_loss(losses, np.ones((1, 7), dtype=bool), length=8,
                           positions=cx.document_positions(tokens, 0)[:, 1:])
    # targets at document position >= 1: t=1 (pos 1), 2 (2), 4 (1), 5 (2), 6 (3); t=3 and t=7 start documents
    assert [(r["count"], r["loss"]) for r in doc] == [(2, (0 + 3) / 2), (3, (1 + 4 + 5) / 3), (0, None)]


def test_previous_occurrence_matches_a_loop():
    rng = np.random.default_rng(1)
    x = rng.integers(0, 7, size=(4, 50))
    groups = np.cumsum(rng.random((4, 50)) < 0.1, axis=1)
    for g in (None, groups):
        prev = cx.previous_occurrence(x, g)
        for r in range(4):
            for i in range(50):
                want = max((j for j in range(i) if x[r, j] == x[r, i] and (g is None or g[r, j] == g[r, i])),
                           default=-1)
                assert prev[r, i] == want


def test_recall_hits_and_distances_on_a_hand_made_window():
    #        0  1  2  3  4  5  6  7  8  9
    x = np.array([[5, 1, 2, 7, 1, 2, 9, 1, 3, 1]])
    hit, dist = cx.recall_targets(x)
    # target t (column t-1): t=5 (x[4]=1 last seen at 1, x[2]=2 == x[5]): hit at distance 3;
    # t=8 (x[7]=1, nearest at 4, x[5]=2 != 3): no hit, distance 3; t=2, t=5's pair already; t=10 n/a
    assert np.nonzero(hit[0])[0].tolist() == [4]
    assert dist[0, 4] == 3 and dist[0, 7] == 3 and dist[0, 1] == 0
    losses = np.arange(9, dtype=np.float64)[None]
    correct = np.zeros((1, 9), dtype=bool)
    correct[0, 4] = True
    rec = cx.recall_by_distance(losses, correct, hit, dist, ~hit, length=10)
    assert rec["hits"] == 1 and rec["hit_loss"] == 4.0 and rec["hit_acc"] == 1.0
    assert [b["count"] for b in rec["buckets"]] == [0, 1, 0, 0]  # distance 3: bucket [2, 4)
    assert rec["nonhits"] == 8 and rec["nonhit_loss"] == pytest.approx((36 - 4) / 8)
    # a bigram recalled far back, and a repeat of the same token (j + 1 == t - 1)
    x = np.array([[4, 8, 3, 3, 3, 5, 6, 7, 0, 1, 2, 4, 8]])
    hit, dist = cx.recall_targets(x)
    assert {t + 1: int(dist[0, t]) for t in np.nonzero(hit[0])[0]} == {4: 1, 12: 11}  # x[3] after 3,3; 4 8 again
    # document masking: an occurrence in an earlier document does not count
    x = np.array([[4, 8, 0, 6, 4, 8]])
    assert cx.recall_targets(x)[0][0, 4] and not cx.recall_targets(x, eos_id=0)[0][0, 4]


def test_copy_probe_separates_a_copier_from_a_model_that_cannot_see_far():
    vocab, L = 512, 128
    filler = np.arange(256)  # text tokens disjoint from the copied ones: only the copy can be predicted
    pool = np.arange(256, 512)
    far, near = {}, {}
    for d in cx.copy_lengths(L):
        rows = cx.copy_windows(filler, pool, length=L, d=d, trials=3, seed=(0, L, d))
        pairs = cx.copy_pairs(L, d)
        region = rows[:, L - 2 * d * pairs:].reshape(3, pairs, 2, d)
        assert rows.shape == (3, L) and (region[:, :, 0] == region[:, :, 1]).all()
        far[d] = cx.copy_scores(scorer(InductionLM(vocab)).score(rows).losses, d)
        near[d] = cx.copy_scores(scorer(InductionLM(vocab, lookback=8)).score(rows).losses, d)
    assert list(far) == [2, 4, 8, 16, 32, 64]
    for d in far:
        assert far[d]["loss_second"] < 0.01 and far[d]["score"] > 5  # copies at every distance
        assert near[d]["loss_first"] == pytest.approx(far[d]["loss_first"])
        if d <= 8:
            assert near[d]["score"] > 5
        else:  # the copy is further back than it can see: no better than the first copy
            assert abs(near[d]["score"]) < 0.5
    with pytest.raises(ValueError):
        cx.copy_windows(filler, pool, length=L, d=65, trials=1, seed=(0,))


def test_copy_windows_fill_the_last_quarter_with_pairs_for_short_d():
    rows = cx.copy_windows(np.arange(100), np.arange(100, 200), length=32, d=2, trials=1, seed=(0,))
    assert cx.copy_pairs(32, 2) == 2 and cx.copy_pairs(32, 16) == 1 and cx.copy_pairs(32, 4) == 1
    region = rows[0, 24:].reshape(2, 2, 2)  # two pairs of S S
    assert (region[:, 0] == region[:, 1]).all() and len(set(rows[0, 24:].tolist())) == 4
    assert rows[0, :24].max() < 100  # text before them
    losses = np.arange(1, 32, dtype=np.float64)[None]  # target t's loss is t
    # scored: the second token of each copy: targets 25 and 29 (first copies), 27 and 31 (second copies)
    assert cx.copy_scores(losses, 2) == {"d": 2, "pairs": 2, "loss_first": 27.0, "loss_second": 29.0, "score": -2.0}


def test_passkey_windows_place_the_needle_at_each_depth():
    filler, pool, cue = np.arange(100, 400), np.arange(10, 20), np.array([1, 2, 3])
    for depth in (0.1, 0.5, 0.9):
        p = cx.passkey_windows(filler, pool, length=64, depth=depth, trials=2, key_tokens=4, distractors=3, cue=cue,
                               seed=(7, 64, 0))
        assert p.rows.shape == (2, 64 - 5 + 4 * 5) and p.trials == 2  # shared part, then 4 branches of cue + key
        w = p.windows()
        assert w.shape == (2 * 4, 64)
        assert (w[:, p.key_start - 3: p.key_start] == cue).all()  # the cue before the needle
        assert (w[:, -7:-4] == cue).all()  # and before the question at the end
        for k in range(2):
            trial = w[4 * k: 4 * k + 4]
            assert (trial[0, -4:] == trial[0, p.key_start: p.key_start + 4]).all()  # candidate 0: the true key
            assert all((trial[i, :-4] == trial[0, :-4]).all() for i in range(4))  # only the final key differs
            assert len({tuple(r[-4:]) for r in trial}) == 4
            assert (p.rows[k, p.key_columns()] == trial[:, -4:]).all()
        assert p.key_start == round(depth * (64 - 14)) + 3
    again = cx.passkey_windows(filler, pool, length=64, depth=0.5, trials=2, key_tokens=4, distractors=3, cue=cue,
                               seed=(7, 64, 0))
    assert (again.rows == cx.passkey_windows(filler, pool, length=64, depth=0.5, trials=2, key_tokens=4,
                                             distractors=3, cue=cue, seed=(7, 64, 0)).rows).all()


def test_branch_layout_gives_each_branch_the_shared_part_and_itself():
    positions, mask = cx.branch_layout(3, 2, 2)
    assert positions.tolist() == [0, 1, 2, 3, 4, 3, 4]
    assert mask.astype(int).tolist() == [[1, 0, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0, 0],
                                         [1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0, 0],
                                         [1, 1, 1, 0, 0, 1, 0], [1, 1, 1, 0, 0, 1, 1]]


def test_packed_passkey_rows_score_as_their_separate_windows(tmp_path):
    """A real (untrained) Hugging Face model, loaded as eval loads it: the packed row's key losses are those of
    the candidate windows run one by one."""
    from gl_ray.evaluate import load_model
    from gl_ray.model import build_model

    build_model("tiny", 512, 64, seed=3).save_pretrained(tmp_path / "m")
    model = scorer(load_model(str(tmp_path / "m"), torch.device("cpu")))
    probe = cx.passkey_windows(np.arange(300), np.arange(300, 500), length=48, depth=0.5, trials=2, key_tokens=3,
                               distractors=4, cue=np.array([7, 8]), seed=(1,))
    packed = model.score(probe.rows, positions=probe.positions, mask=probe.mask).losses
    separate = model.score(probe.windows()).losses[:, -3:].reshape(2, 5, 3)  # the final key's targets
    assert packed[:, probe.key_columns() - 1] == pytest.approx(separate, abs=1e-4)


def test_passkey_ranking_with_hand_made_losses_and_with_models():
    probe = cx.passkey_windows(np.arange(100), np.arange(100, 200), length=16, depth=0.5, trials=2, key_tokens=2,
                               distractors=2, cue=np.array([1]), seed=(0,))
    cols = probe.key_columns() - 1  # [3 candidates, 2]: loss columns of each candidate's key tokens
    losses = np.ones((2, probe.rows.shape[1] - 1))
    losses[0, cols[0]] = 0.5  # trial 0: the true key is the likeliest
    losses[1, cols[1]] = 0.25  # trial 1: a distractor beats it, the other ties
    s = cx.passkey_scores(losses, probe)
    assert s["accuracy"] == 0.5 and s["win_rate"] == pytest.approx((1 + 1 + 0 + 0.5) / 4)
    assert s["key_logprob"] == pytest.approx((-0.5 - 1.0) / 2) and s["distance"] == 16 - 2 - probe.key_start
    filler, pool, cue = np.arange(256), np.arange(256, 500), np.array([500, 501, 502, 503])
    probe = cx.passkey_windows(filler, pool, length=96, depth=0.1, trials=3, key_tokens=4, distractors=7, cue=cue,
                               seed=(0, 96, 0))

    def run(model):
        return cx.passkey_scores(scorer(model).score(probe.rows, positions=probe.positions, mask=probe.mask).losses,
                                 probe)

    told = run(InductionLM(512))
    assert told["accuracy"] == 1.0 and told["key_logprob"] > -0.01  # the model that reads the key back
    blind = run(InductionLM(512, lookback=16))
    assert blind["accuracy"] == 0.0 and blind["win_rate"] == 0.5  # every key equally likely: ties only


def test_headlines_pick_the_farthest_bucket_with_hits():
    row = {"recall": {"buckets": [{"lo": 1, "hi": 2, "count": 3, "acc": 0.9}, {"lo": 2, "hi": 4, "count": 2,
                                                                                "acc": 0.5},
                                  {"lo": 4, "hi": 8, "count": 0, "acc": None}]},
           "passkey": {"depths": [{"accuracy": 1.0}, {"accuracy": 0.5}]},
           "copy": [{"d": 2, "score": 3.0}, {"d": 4, "score": 1.0}]}
    assert cx.headlines(row) == {"recall_acc_far": 0.5, "recall_far_bucket": [2, 4], "passkey_acc": 0.75,
                                 "copy_score": 1.0, "copy_d": 4}
    assert cx.headlines({})["passkey_acc"] is None


# --- Welch's t ----------------------------------------------------------------------------------------------

def test_welch_t_against_known_values():
    # Wikipedia's "Welch's t-test", example 1: t = -2.46, df = 24.99, p = 0.021 (scipy: -2.45536, 24.9885, 0.021378)
    a = [27.5, 21.0, 19.0, 23.6, 17.0, 17.9, 16.9, 20.1, 21.9, 22.6, 23.1, 19.6, 19.0, 21.7, 21.4]
    b = [27.1, 22.0, 20.8, 23.4, 23.4, 23.5, 25.8, 22.0, 24.8, 20.2, 21.9, 22.1, 22.9, 20.5, 24.4]
    w = welch_t(a, b)
    assert w["t"] == pytest.approx(-2.455356398286006, rel=1e-9)
    assert w["df"] == pytest.approx(24.988529290231416, rel=1e-9)
    assert w["p"] == pytest.approx(0.021378001462866992, rel=1e-6)
    # closed forms: df 1 is Cauchy, df 2 has p = 1 - |t| / sqrt(2 + t^2); a table value; a fractional df
    for t in (0.3, 1.0, 4.0, 30.0):
        assert t_p_value(t, 1) == pytest.approx(1 - 2 / math.pi * math.atan(t), rel=1e-10)
        assert t_p_value(t, 2) == pytest.approx(1 - t / math.sqrt(2 + t * t), rel=1e-10)
    assert t_p_value(2.228, 10) == pytest.approx(0.05001177181711132, rel=1e-8)
    assert t_p_value(3.0, 1.5) == pytest.approx(0.13354775425491328, rel=1e-8)
    assert t_p_value(0.0, 7) == pytest.approx(1.0) and betainc(2.0, 3.0, 0.0) == 0.0
    assert betainc(2.0, 3.0, 0.4) == pytest.approx(0.5248, rel=1e-12)  # 1 - sum_{k<2} C(4,k) .4^k .6^(4-k)
    assert welch_t([1.0], [2.0, 3.0]) is None
    assert welch_t([1.0, 1.0], [1.0, 1.0])["p"] == 1.0 and welch_t([1.0, 1.0], [2.0, 2.0])["p"] is None


def test_significance_tests_each_arm_against_each_baseline():
    def row(run, t, acc):
        return {"run": run, "time_to_target_s": t, "final_val_loss_final_len": 5.0, "recall_acc_far": acc,
                "passkey_acc": None, "copy_score": None}

    rows = [row("g-s0", 10.0, 0.50), row("g-s1", 11.0, 0.52), row("g-s2", 10.5, 0.49),
            row("long-s0", 20.0, 0.51), row("long-s1", 21.0, 0.50), row("long-s2", 19.0, 0.53),
            row("short-s0", None, 0.1), row("short-s1", None, 0.12)]
    tests = significance(rows, ["long", "short"])
    got = {(t["arm"], t["baseline"], t["metric"]): t for t in tests}
    assert got[("g", "long", "time_to_target_s")]["supported"]  # 10.5 +- 0.5 vs 20 +- 1
    assert not got[("g", "long", "recall_acc_far")]["supported"]  # 0.503 vs 0.513: noise
    assert got[("g", "short", "recall_acc_far")]["supported"]
    assert ("g", "short", "time_to_target_s") not in got  # short never reached the target: nothing to test
    assert got[("g", "long", "final_val_loss_final_len")]["p"] == 1.0  # equal, no spread
    assert {k[:2] for k in got} == {("g", "long"), ("g", "short"), ("short", "long"), ("long", "short")}


# --- the eval on a tiny model and the tiny dataset ------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_models(tiny_data, tmp_path_factory):
    """Two untrained tiny models saved as run final/ folders (eval only reads them)."""
    from gl_ray.data.manifest import load_manifest
    from gl_ray.model import build_model

    root = tmp_path_factory.mktemp("models")
    vocab = load_manifest(tiny_data).vocab_size
    paths = []
    for name, seed in (("m0", 0), ("m1", 1)):
        build_model("tiny", vocab, 64, seed=seed).save_pretrained(root / name / "final")
        paths.append(str(root / name / "final"))
    return paths


SMALL = ContextSettings(passkey_trials=2, distractors=3, copy_trials=2)


def test_eval_context_metrics_are_deterministic_and_consistent(tiny_models, tiny_data):
    kw = dict(max_tokens=16384, device="cpu", context=SMALL, progress=lambda line: None)
    res = evaluate_models(tiny_models, tiny_data, [32, 128], **kw)
    assert json.dumps(res) == json.dumps(evaluate_models(tiny_models, tiny_data, [32, 128], **kw))
    plain = evaluate_models(tiny_models, tiny_data, [32, 128], max_tokens=16384, device="cpu", context=NO_CONTEXT)
    assert plain["models"] == res["models"] and "context" not in plain  # loss and ppl untouched by the metrics
    ctx = res["context"]
    assert ctx["eos_token_id"] is not None and ctx["settings"]["distractors"] == 3
    for label, by_len in ctx["models"].items():
        for L in (32, 128):
            row, loss = by_len[str(L)], res["models"][label][str(L)]["loss"]
            pos = row["position"]
            assert [(b["lo"], b["hi"]) for b in pos] == cx.log2_buckets(L)
            assert sum(b["count"] for b in pos) == res["tokens"] // L * (L - 1)
            assert sum(b["loss"] * b["count"] for b in pos) / sum(b["count"] for b in pos) == pytest.approx(loss,
                                                                                                              rel=1e-5)
            assert "doc_position" in row and sum(b["count"] for b in row["doc_position"]) < sum(b["count"] for b in pos)
            rec = row["recall"]
            assert rec["hits"] == sum(b["count"] for b in rec["buckets"]) > 0
            assert rec["hits"] + rec["nonhits"] == res["tokens"] // L * (L - 1)
            assert [p["depth"] for p in row["passkey"]["depths"]] == [0.1, 0.5, 0.9]
            assert [c["d"] for c in row["copy"]] == cx.copy_lengths(L)


def test_eval_loss_is_the_loss_it_always_was(tiny_models, tiny_data):
    """The headline loss is lm_loss's per-batch mean weighted by rows, as before the context metrics: exactly."""
    from gl_ray.data.stream import TokenStream
    from gl_ray.evaluate import load_model
    from gl_ray.model import batch_inputs, lm_loss

    for masking in (False, True):
        res = evaluate_models(tiny_models[:1], tiny_data, [64], max_tokens=16384, device="cpu", batch_tokens=1024,
                              document_masking=masking, context=ContextSettings(metrics=("position", "recall")))
        val = TokenStream(tiny_data, "val")
        rows = torch.from_numpy(np.asarray(val.read(0, 16384), dtype=np.int64).reshape(-1, 64))
        model, total = load_model(tiny_models[0], torch.device("cpu")), 0.0
        with torch.no_grad():
            for i in range(0, len(rows), 16):
                x = rows[i: i + 16]
                inputs = batch_inputs(x, position_mode="extrapolate", seq_len=64, final_len=64,
                                      eos_id=val.manifest.eos_token_id if masking else None)
                total += float(lm_loss(model, x, **inputs)) * len(x)
        assert res["models"]["m0"]["64"]["loss"] == total / len(rows)
        row = res["context"]["models"]["m0"]["64"]
        if masking:  # targets at document starts are not scored; the doc curve counts the same targets
            assert sum(b["count"] for b in row["doc_position"]) == sum(b["count"] for b in row["position"])


def test_eval_cli_writes_a_png_per_metric_and_refuses_bad_input(tiny_models, tiny_data, tmp_path, capsys):
    from gl_ray.cli import main

    out = tmp_path / "ev" / "eval.json"
    base = ["eval", "--model", tiny_models[0], "--data", tiny_data, "--device", "cpu", "--max-tokens", "2048",
            "--passkey-trials", "1", "--distractors", "2", "--copy-trials", "1"]
    assert main([*base, "--lengths", "32,64", "--out", str(out), "--copy-lengths", "4,16"]) == 0
    res = json.loads(out.read_text())
    assert [c["d"] for c in res["context"]["models"]["m0"]["32"]["copy"]] == [4, 16]
    for name in ("eval.png", "eval_position.png", "eval_recall.png", "eval_passkey.png", "eval_copy.png"):
        assert (out.parent / name).stat().st_size > 5_000
    capsys.readouterr()
    for args, words in ((["--lengths", "10000000"], "longer than the val split"),
                        (["--lengths", "64", "--passkey-depths", "0.5,1.0"], "strictly between 0 and 1"),
                        (["--lengths", "64", "--passkey-depths", "0"], "strictly between 0 and 1"),
                        (["--lengths", "32,64", "--copy-lengths", "128"], "--copy-lengths 128"),
                        (["--lengths", "64", "--copy-lengths", "33"], "--copy-lengths 33"),
                        (["--lengths", "64", "--metrics", "recall,needle"], "--metrics needle")):
        assert main([*base, *args, "--out", str(tmp_path / "bad.json")]) == 2, args
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and words in err, err
    assert main([*base, "--lengths", "64", "--metrics", "none", "--out", str(tmp_path / "plain.json")]) == 0
    assert "context" not in json.loads((tmp_path / "plain.json").read_text())


def test_report_puts_eval_headlines_beside_time_to_target(tmp_path, capsys):
    """Two seeds per arm: the arm table carries the eval's numbers at the final length and every difference from
    each fixed-length arm gets a Welch's t-test; `gl-ray report --eval` reads the eval JSON."""
    from gl_ray.cli import main

    runs, ctx = [], {}
    curves = {"grow": [(64, 5.0, 1.0), (128, 4.0, 2.0), (128, 3.0, 3.0)], "fixed128": [(128, 5.0, 2.0),
                                                                                      (128, 3.0, 4.0)],
              "fixed64": [(64, 5.0, 1.0), (64, 4.0, 2.0)]}
    acc = {"grow": (0.60, 0.62), "fixed128": (0.61, 0.60), "fixed64": (0.10, 0.12)}
    for arm, pts in curves.items():
        for k in range(2):
            run = tmp_path / "runs" / f"{arm}-s{k}"
            run.mkdir(parents=True)
            lines = [{"step": i + 1, "stage": 0, "loss": v + 0.01 * k, "elapsed_s": t + 0.1 * k,
                      "tokens": 1000 * (i + 1), "seq_len": L, "flops": 1e9 * (i + 1), "val_loss_final_len": v}
                     for i, (L, v, t) in enumerate(pts)]
            (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
            runs.append(str(run))
            ctx[run.name] = {"128": {"recall": {"buckets": [{"lo": 64, "hi": 128, "count": 5, "acc": acc[arm][k]}]},
                                     "passkey": {"depths": [{"accuracy": 0.5}]},
                                     "copy": [{"d": 64, "score": 1.0 + k}]}}
    ev = {"lengths": [64, 128], "models": {n: {} for n in ctx}, "context": {"models": ctx}}
    (tmp_path / "eval.json").write_text(json.dumps(ev))
    rep = build_report(runs, str(tmp_path / "rep"), eval_res=ev)
    assert rep["eval_length"] == 128 and rep["baseline_arms"] == ["fixed128", "fixed64"]
    arms = {a["arm"]: a for a in rep["arms"]}
    assert arms["grow"]["recall_acc_far"]["mean"] == pytest.approx(0.61)
    got = {(t["arm"], t["baseline"], t["metric"]): t["supported"] for t in rep["significance"]}
    assert got[("grow", "fixed64", "recall_acc_far")] and not got[("grow", "fixed128", "recall_acc_far")]
    assert got[("grow", "fixed128", "time_to_target_s")]
    assert main(["report", *runs, "--out", str(tmp_path / "rep2"), "--eval", str(tmp_path / "eval.json")]) == 0
    md = (tmp_path / "rep2" / "report.md").read_text()
    assert "## Context use (eval at length 128)" in md and "## Significance" in md
    assert "grow vs fixed64: recall acc (farthest bucket)" in md
    capsys.readouterr()
    assert main(["report", *runs, "--out", str(tmp_path / "rep3"), "--eval", str(tmp_path / "none.json")]) == 2
    assert "--eval" in capsys.readouterr().err
