"""Pythia (GPT-NeoX) RoPE models and GrowLength position ids. Single-device code: torch and transformers only.

    model = build_model("pythia-70m", vocab_size=50277, max_position_embeddings=2048)
    pos = position_ids("pose", batch=8, seq_len=128, final_len=1024, generator=g)  # LongTensor [8, 128]
    loss = lm_loss(model, input_ids, pos)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from gl_ray.errors import UserError


@dataclass(frozen=True)
class Preset:
    layers: int
    hidden: int
    heads: int


# Pythia sizes (Biderman et al. 2023) plus two CPU-sized ones. All: rotary pct 0.25, parallel residual, untied
# embeddings, MLP 4x hidden.
PRESETS: dict[str, Preset] = {
    "tiny": Preset(2, 64, 4),
    "pythia-14m": Preset(6, 128, 4),
    "pythia-70m": Preset(6, 512, 8),
    "pythia-160m": Preset(12, 768, 12),
    "pythia-410m": Preset(24, 1024, 16),
}

POSITION_MODES = ("extrapolate", "interpolate", "pose")


def padded_vocab(vocab_size: int, multiple: int = 128) -> int:
    """Embedding rows: the tokenizer's vocab padded up to a multiple of 128 (Pythia pads 50277 to 50304)."""
    return -(-vocab_size // multiple) * multiple


def check_preset(preset: str, what: str = "model.preset") -> Preset:
    """The preset of that name; UserError naming `what` (the config key or flag) if there is none."""
    if preset not in PRESETS:
        raise UserError(f"{what} {preset!r} unknown; choose one of {', '.join(PRESETS)}")
    return PRESETS[preset]


def model_config(preset: str, vocab_size: int, max_position_embeddings: int, rope_theta: float = 10000.0,
                 init_std: float = 0.02, eos_token_id: int = 0) -> GPTNeoXConfig:
    p = check_preset(preset)
    return GPTNeoXConfig(
        vocab_size=padded_vocab(vocab_size),
        hidden_size=p.hidden,
        num_hidden_layers=p.layers,
        num_attention_heads=p.heads,
        intermediate_size=4 * p.hidden,
        max_position_embeddings=max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta, "partial_rotary_factor": 0.25},
        use_parallel_residual=True,
        tie_word_embeddings=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        initializer_range=init_std,
        bos_token_id=eos_token_id,
        eos_token_id=eos_token_id,
        attn_implementation="sdpa",
    )


def build_model(preset: str, vocab_size: int, max_position_embeddings: int, rope_theta: float = 10000.0,
                init_std: float = 0.02, eos_token_id: int = 0, seed: int = 0) -> GPTNeoXForCausalLM:
    """A freshly initialised model; the same seed gives the same weights."""
    cfg = model_config(preset, vocab_size, max_position_embeddings, rope_theta, init_std, eos_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPTNeoXForCausalLM(cfg)
    return model


def flops_per_token(preset: str, vocab_size: int, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward = 3x forward), as in the PaLM/Chinchilla accounting:
    6 * (non-embedding params + unembedding) + 6 * layers * seq_len * hidden (attention scores and values)."""
    p = PRESETS[preset]
    per_layer = 12 * p.hidden * p.hidden  # qkv+out (4 h^2) + MLP (8 h^2)
    matmul_params = p.layers * per_layer + padded_vocab(vocab_size) * p.hidden
    return 6.0 * matmul_params + 6.0 * p.layers * seq_len * p.hidden


def position_ids(mode: str, batch: int, seq_len: int, final_len: int,
                 generator: torch.Generator | None = None) -> torch.Tensor | None:
    """Position ids [batch, seq_len] for a training batch of a stage with length `seq_len`.

    extrapolate: None (the model uses 0..seq_len-1, the paper's default).
    interpolate: 0..seq_len-1 stretched by final_len/seq_len (rounded down), spanning the final range.
    pose:        two chunks with a random skip between them (PoSE, Zhu et al. 2023) so that the ids cover up to
                 final_len - 1 while the sequence holds seq_len tokens; one draw per sequence.
    At the final length every mode gives ordinary positions (returned as None).
    """
    if mode not in POSITION_MODES:
        raise UserError(f"model.position_mode={mode!r} is not one of {' | '.join(POSITION_MODES)}")
    if mode == "extrapolate" or seq_len >= final_len:
        return None
    base = torch.arange(seq_len)
    if mode == "interpolate":
        return ((base * final_len) // seq_len).unsqueeze(0).expand(batch, -1).contiguous()
    cut = torch.randint(1, seq_len, (batch, 1), generator=generator)  # first chunk: [0, cut)
    skip = torch.randint(0, final_len - seq_len + 1, (batch, 1), generator=generator)
    return base.unsqueeze(0) + (base.unsqueeze(0) >= cut).long() * skip


def lm_loss(model: GPTNeoXForCausalLM, input_ids: torch.Tensor, pos: torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy over a [batch, seq_len] block of tokens (seq_len - 1 targets per row).

    With explicit position ids we also pass an all-ones attention mask: without one, transformers reads
    position ids that jump as packed sequences and would cut attention at every jump.
    """
    mask = None if pos is None else torch.ones_like(input_ids)
    out = model(input_ids=input_ids, position_ids=pos, attention_mask=mask, labels=input_ids, use_cache=False)
    return out.loss
