import pytest
import torch

from gl_ray.errors import UserError
from gl_ray.model import (
    PRESETS,
    build_model,
    check_attention,
    document_pairs,
    document_mask,
    flops_per_token,
    lm_loss,
    padded_vocab,
    position_ids,
    preset_shape,
)


def test_presets_match_pythia():
    assert (PRESETS["pythia-14m"].layers, PRESETS["pythia-14m"].hidden, PRESETS["pythia-14m"].heads) == (6, 128, 4)
    assert (PRESETS["pythia-31m"].layers, PRESETS["pythia-31m"].hidden, PRESETS["pythia-31m"].heads) == (6, 256, 8)
    assert (PRESETS["pythia-70m"].layers, PRESETS["pythia-70m"].hidden, PRESETS["pythia-70m"].heads) == (6, 512, 8)
    assert (PRESETS["pythia-160m"].layers, PRESETS["pythia-160m"].hidden) == (12, 768)
    assert (PRESETS["pythia-410m"].layers, PRESETS["pythia-410m"].hidden, PRESETS["pythia-410m"].heads) == \
        (24, 1024, 16)


def test_model_config_is_pythia_shaped():
    m = build_model("tiny", vocab_size=1000, max_position_embeddings=256)
    c = m.config
    assert c.vocab_size == 1024 == padded_vocab(1000)
    assert padded_vocab(50277) == 50304
    assert c.rope_parameters["partial_rotary_factor"] == 0.25 and c.use_parallel_residual
    assert not c.tie_word_embeddings
    assert m.get_output_embeddings().weight.data_ptr() != m.gpt_neox.embed_in.weight.data_ptr()
    assert c._attn_implementation == "gl_ray_sdpa"  # transformers' sdpa, without its per-forward mask checks


def test_same_seed_same_weights():
    a = build_model("tiny", 500, 128, seed=3).state_dict()
    b = build_model("tiny", 500, 128, seed=3).state_dict()
    c = build_model("tiny", 500, 128, seed=4).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_unknown_preset():
    with pytest.raises(UserError, match="unknown"):
        build_model("gpt-5", 100, 128)


def test_extrapolate_uses_plain_positions():
    assert position_ids("extrapolate", 2, 16, 64) is None
    assert position_ids("pose", 2, 64, 64) is None  # final stage: ordinary positions in every mode


def test_interpolate_stretches_to_the_final_range():
    pos = position_ids("interpolate", 3, 16, 64)
    assert pos.shape == (3, 16)
    assert pos[0].tolist() == [4 * i for i in range(16)]
    assert int(pos.max()) < 64


def test_pose_ids_skip_once_and_cover_the_final_range():
    g = torch.Generator().manual_seed(0)
    pos = position_ids("pose", 64, 16, 128, generator=g)
    assert pos.shape == (64, 16)
    diffs = pos[:, 1:] - pos[:, :-1]
    assert (diffs >= 1).all()  # increasing
    assert ((diffs != 1).sum(dim=1) <= 1).all()  # one skip at most
    assert int(pos.max()) <= 127 and int(pos[:, 0].max()) == 0
    assert int(pos[:, -1].max()) > 64  # some rows reach far positions
    g2 = torch.Generator().manual_seed(0)
    assert torch.equal(pos, position_ids("pose", 64, 16, 128, generator=g2))


def test_jumping_positions_do_not_cut_attention():
    # transformers reads non-consecutive position ids as packed sequences unless a mask is given; lm_loss
    # passes one. The last token must still see the first.
    torch.manual_seed(0)
    m = build_model("tiny", 256, 256).eval()
    x = torch.randint(2, 256, (1, 16))
    pos = position_ids("interpolate", 1, 16, 128)
    y = x.clone()
    y[0, 0] = (x[0, 0] + 1) % 256
    with torch.no_grad():
        mask = torch.ones_like(x)
        a = m(input_ids=x, position_ids=pos, attention_mask=mask).logits[0, -1]
        b = m(input_ids=y, position_ids=pos, attention_mask=mask).logits[0, -1]
        assert not torch.allclose(a, b)
        assert torch.isfinite(lm_loss(m, x, pos))


def test_flops_per_token_grows_with_length():
    shape = preset_shape("pythia-160m", 50277)
    assert flops_per_token(shape, 2048) > flops_per_token(shape, 128) > 0


# ---- document masking (data.document_masking) and attention backends ----

EOS = 0


def packed_row(doc_lengths: list[int], vocab: int = 256, seed: int = 0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A row of documents back to back, each ending with EOS, and the documents alone."""
    g = torch.Generator().manual_seed(seed)
    docs = [torch.cat([torch.randint(1, vocab, (n - 1,), generator=g), torch.tensor([EOS])]) for n in doc_lengths]
    return torch.cat(docs).unsqueeze(0), docs


def summed_loss(model, x, pos=None, docs=None) -> torch.Tensor:
    """Sum (not mean) of the next-token losses that lm_loss trains on."""
    targets = x.shape[1] - 1 if docs is None else int((~docs.starts[:, 1:]).sum())
    return lm_loss(model, x, pos, docs) * targets


def test_document_mask_finds_documents_and_restarts_positions():
    x = torch.tensor([[5, 6, EOS, 7, EOS, 8, 9, 10]])
    docs = document_mask(x, EOS)
    assert docs.starts.tolist() == [[True, False, False, True, False, True, False, False]]
    assert docs.positions.tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]]
    mask = docs.model_kwargs["attention_mask"][0, 0]
    assert mask[4].tolist() == [False, False, False, True, True, False, False, False]  # EOS of doc 2 sees doc 2
    assert mask[7].tolist() == [False] * 5 + [True] * 3


@pytest.mark.parametrize("mode", ["extrapolate", "interpolate", "pose"])
def test_packed_masked_row_equals_its_documents_one_by_one(mode):
    """Summed loss and gradients of a packed, masked row equal those of its documents run alone (fp32, CPU)."""
    torch.manual_seed(0)
    lengths, seq_len, final_len = [9, 14, 5, 4], 32, 128  # 32 tokens, 28 targets within documents
    x, docs_alone = packed_row(lengths)
    model = build_model("tiny", 256, final_len).train()

    def draw(batch, local):  # the same PoSE draw for the row and for each document alone
        return position_ids(mode, batch, seq_len, final_len, torch.Generator().manual_seed(7), local=local)

    docs = document_mask(x, EOS)
    packed = summed_loss(model, x, draw(1, docs.positions), docs)
    packed.backward()
    grad_packed = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    alone = torch.zeros(())
    offset = 0
    for d in docs_alone:  # each document as its own row, with the positions it has inside the packed row
        pos = draw(1, docs.positions)[:, offset: offset + len(d)]
        offset += len(d)
        alone = alone + summed_loss(model, d.unsqueeze(0), pos)
    alone.backward()
    # fp32: a sum of ~155 over 28 targets holds ~1e-5 of rounding, so compare per target (and relatively)
    assert packed.item() / 28 == pytest.approx(alone.item() / 28, abs=1e-5)
    assert packed.item() == pytest.approx(alone.item(), rel=1e-6)
    for n, p in model.named_parameters():
        assert torch.allclose(grad_packed[n], p.grad, atol=1e-5), n


def test_pose_and_interpolate_positions_apply_per_document():
    x = torch.tensor([[5, 6, 7, EOS, 8, 9, EOS, 3]])
    local = document_mask(x, EOS).positions
    assert position_ids("interpolate", 1, 8, 32, local=local).tolist() == [[0, 4, 8, 12, 0, 4, 8, 0]]
    assert torch.equal(position_ids("extrapolate", 1, 8, 32, local=local), local)
    pose = position_ids("pose", 1, 8, 32, torch.Generator().manual_seed(0), local=local)
    assert (pose[local == 0] == 0).all()  # every document starts at 0
    assert int(pose.max()) < 32


@pytest.mark.parametrize("masked", [False, True], ids=["causal", "document-masked"])
def test_flex_attention_agrees_with_sdpa(masked):
    """flex (forward only: torch has no flex backward on CPU) gives the same losses as sdpa, to 1e-5."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    torch.manual_seed(0)
    x = torch.cat([packed_row([7, 12, 13], seed=1)[0], packed_row([20, 12], seed=2)[0]])
    sdpa = build_model("tiny", 256, 64, seed=3).eval()
    flex = build_model("tiny", 256, 64, seed=3, attention="flex").eval()
    assert flex.config._attn_implementation == "gl_ray_flex"  # transformers' flex, without its mask builder
    with torch.no_grad():
        if masked:
            a = lm_loss(sdpa, x, document_mask(x, EOS).positions, document_mask(x, EOS, "sdpa"))
            b = lm_loss(flex, x, document_mask(x, EOS).positions, document_mask(x, EOS, "flex"))
        else:
            a, b = lm_loss(sdpa, x), lm_loss(flex, x)
    assert a.item() == pytest.approx(b.item(), abs=1e-5)


def test_activation_checkpointing_keeps_gradients():
    torch.manual_seed(0)
    x, _ = packed_row([10, 22])
    grads = []
    for ac in (False, True):
        model = build_model("tiny", 256, 64, seed=1, activation_checkpointing=ac).train()
        docs = document_mask(x, EOS)
        lm_loss(model, x, docs.positions, docs).backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert all(torch.allclose(grads[0][n], grads[1][n], atol=1e-5) for n in grads[0])


def test_rope_has_no_position_table():
    """Positions beyond max_position_embeddings run (RoPE is computed, not looked up)."""
    model = build_model("tiny", 256, 32).eval()
    x = torch.randint(1, 256, (1, 48))
    with torch.no_grad():
        assert torch.isfinite(lm_loss(model, x, torch.arange(48).unsqueeze(0) + 1000))


def test_attention_backend_errors():
    """An unknown backend, and flex or flash for a run that trains on CPU, are refused with the key's name."""
    with pytest.raises(UserError, match="not one of"):
        check_attention("xformers")
    with pytest.raises(UserError, match="flex trains on CUDA only"):
        check_attention("flex", on_gpu=False)
    with pytest.raises(UserError, match="flash_attention_2 runs on CUDA only"):
        check_attention("flash_attention_2", on_gpu=False)
    assert check_attention("flash_attention_2", on_gpu=True) == "gl_ray_fa2"


def test_flops_follow_palm_and_count_only_pairs_inside_documents():
    p = PRESETS["pythia-160m"]
    shape = preset_shape("pythia-160m", 50277)
    base = flops_per_token(shape, 0)  # 6N alone
    assert base == pytest.approx(6 * (p.layers * 12 * p.hidden ** 2 + padded_vocab(50277) * p.hidden))
    assert flops_per_token(shape, 2048) - base == pytest.approx(12 * p.layers * p.hidden * 2048)
    x = torch.tensor([[5, 6, EOS, 7, EOS, 8, 9, 10]])  # documents of 3, 2 and 3 tokens
    assert float(document_pairs(document_mask(x, EOS).starts)) == 9 + 4 + 9
    assert float(document_pairs(document_mask(torch.ones(2, 8, dtype=torch.long), EOS).starts)) == 2 * 64


# ---- the sliding-window mask (schedule.mode window) ----

def token_losses(model, x, docs) -> torch.Tensor:
    """Next-token loss at each position [batch, seq_len - 1] (the target of position t is token t + 1)."""
    logits = model(input_ids=x, position_ids=docs.positions, use_cache=False, **docs.model_kwargs).logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), x[:, 1:], reduction="none")


@pytest.mark.parametrize("masked", [False, True], ids=["causal", "document-masked"])
def test_a_window_as_long_as_the_row_is_plain_attention(masked):
    torch.manual_seed(0)
    x = torch.cat([packed_row([7, 12, 13], seed=1)[0], packed_row([20, 12], seed=2)[0]])
    model = build_model("tiny", 256, 64, seed=3).eval()
    eos = EOS if masked else None
    with torch.no_grad():
        plain = lm_loss(model, x, document_mask(x, EOS).positions, document_mask(x, EOS)) if masked \
            else lm_loss(model, x)
        for window in (32, 40):
            w = document_mask(x, eos, window=window)
            assert lm_loss(model, x, w.positions, w).item() == pytest.approx(plain.item(), abs=1e-6)
        narrow = document_mask(x, eos, window=4)
        assert lm_loss(model, x, narrow.positions, narrow).item() != pytest.approx(plain.item(), abs=1e-3)


@pytest.mark.parametrize("eos", [None, EOS], ids=["causal", "document-masked"])
def test_with_a_window_a_token_sees_only_the_last_w_tokens(eos):
    """One layer: the loss at position t changes when token t - w + 1 changes and not when any earlier one does
    (through two layers the reach is 2 (w - 1) tokens, tested as well)."""
    from transformers import GPTNeoXForCausalLM

    from gl_ray.model import model_config

    torch.manual_seed(0)
    w, t = 6, 24
    x = torch.randint(1, 256, (1, 32))
    for layers, reach in ((1, w - 1), (2, 2 * (w - 1))):
        cfg = model_config("tiny", 256, 64)
        cfg.num_hidden_layers = layers
        torch.manual_seed(layers)
        model = GPTNeoXForCausalLM(cfg).eval()
        with torch.no_grad():
            base = token_losses(model, x, document_mask(x, eos, window=w))[0, t]
            for j in range(t - reach - 3, t + 1):
                y = x.clone()
                y[0, j] = (x[0, j] + 1) % 255 + 1
                changed = token_losses(model, y, document_mask(y, eos, window=w))[0, t]
                assert (abs(changed - base) > 1e-6) == (j >= t - reach), (layers, j)
