import pytest
import torch

from gl_ray.errors import UserError
from gl_ray.model import PRESETS, build_model, flops_per_token, lm_loss, padded_vocab, position_ids


def test_presets_match_pythia():
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
    assert c._attn_implementation == "sdpa"


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
    assert flops_per_token("pythia-160m", 50277, 2048) > flops_per_token("pythia-160m", 50277, 128) > 0
