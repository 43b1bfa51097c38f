"""Pythia (GPT-NeoX) RoPE models, GrowLength position ids and document masks. Single-device code: torch and
transformers only.

    model = build_model("pythia-70m", vocab_size=50277, max_position_embeddings=2048, attention="sdpa")
    pos = position_ids("pose", batch=8, seq_len=128, final_len=1024, generator=g)  # LongTensor [8, 128]
    loss = lm_loss(model, input_ids, pos)
    docs = document_mask(input_ids, eos_id=0, attention="sdpa")                   # packed rows, masked
    docs = document_mask(input_ids, eos_id=0, window=256)    # and a sliding window (schedule.mode window)
    loss = lm_loss(model, input_ids, position_ids("extrapolate", 8, 128, 1024, local=docs.positions), docs)

Document masking (data.document_masking): a packed row holds several documents, each ending with its EOS token.
Attention never crosses a document boundary, positions restart at 0 at each document start (the first document
of a row, usually the tail of one cut at the row start, starts at 0 too), and the target right after an EOS (the
first token of the next document) is not trained: under the mask the EOS sees only its own document, so that
target is unpredictable noise, and leaving it out makes a packed row's summed loss exactly that of its documents
run one by one. Per document, the position modes are: extrapolate, plain 0..n-1; interpolate, 0..n-1 stretched by
final_len / seq_len; pose, 0..n-1 with the row's one random skip applied from the row's cut point on.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
from transformers.modeling_outputs import CausalLMOutputWithPast

from gl_ray.attention import block_mask, causal_block_mask, check_attention
from gl_ray.errors import UserError
from gl_ray.loss import linear_cross_entropy


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
                 init_std: float = 0.02, eos_token_id: int = 0, attention: str = "sdpa") -> GPTNeoXConfig:
    """RoPE has no position table: max_position_embeddings only records the longest length trained or meant."""
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
        use_cache=False,  # training and loss evaluation only; generate() turns the cache on itself
        attn_implementation=check_attention(attention),
    )


class GrowLengthLM(GPTNeoXForCausalLM):
    """GPT-NeoX whose forward with `labels` returns only the loss, computed by gl_ray.loss.linear_cross_entropy
    from the last hidden states: the [tokens, vocab] logits never exist whole (no fp32 copy of them either).
    Without labels it is the stock forward (logits for eval and generation). The same modules and state dict as
    GPTNeoXForCausalLM; a run's final/ folder is saved as the stock class."""

    def forward(self, input_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None, **kwargs):
        if labels is None:
            return super().forward(input_ids=input_ids, **kwargs)
        hidden = self.gpt_neox(input_ids, **kwargs).last_hidden_state  # [batch, seq_len, hidden]
        h = hidden[:, :-1].reshape(-1, hidden.shape[-1])  # position t predicts the label at t + 1 (HF's shift)
        loss = linear_cross_entropy(h, self.get_output_embeddings().weight, labels[:, 1:].reshape(-1))
        return CausalLMOutputWithPast(loss=loss)


def build_model(preset: str, vocab_size: int, max_position_embeddings: int, rope_theta: float = 10000.0,
                init_std: float = 0.02, eos_token_id: int = 0, seed: int = 0, *, attention: str = "sdpa",
                activation_checkpointing: bool = False) -> GrowLengthLM:
    """A freshly initialised model; the same seed gives the same weights (whatever the attention backend).

    activation_checkpointing: recompute each transformer block's activations in the backward pass instead of
    keeping them (less memory, about one more forward pass of compute); gradients are unchanged."""
    cfg = model_config(preset, vocab_size, max_position_embeddings, rope_theta, init_std, eos_token_id, attention)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GrowLengthLM(cfg)
    if activation_checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5
        if enable is not None:
            enable()
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def flops_per_token(preset: str, vocab_size: int, seq_len: int, keys_per_token: float | None = None) -> float:
    """Training FLOPs per token (forward + backward = 3x forward), PaLM's accounting (Chowdhery et al. 2022,
    appendix B): 6 * N + 12 * layers * hidden * T, N the matmul parameters (blocks + unembedding).

    T is the keys each query is counted against: seq_len for a dense row (PaLM counts the whole T x T score
    matrix); with document masking only pairs inside documents are attended, so T is their number per token,
    sum of n_d^2 over the row's documents / seq_len (`document_pairs`)."""
    return training_flops(preset, vocab_size, tokens=1, pairs=seq_len if keys_per_token is None else keys_per_token)


def param_count(preset: str, vocab_size: int) -> int:
    """About how many parameters a preset has (blocks, embedding and unembedding; biases and norms left out)."""
    p = PRESETS[preset]
    return p.layers * 12 * p.hidden * p.hidden + 2 * padded_vocab(vocab_size) * p.hidden


def training_flops(preset: str, vocab_size: int, tokens, pairs):
    """FLOPs to train on `tokens` tokens whose queries meet `pairs` keys in all (numbers or tensors): 6 N tokens
    + 12 layers hidden pairs, the accounting of flops_per_token."""
    p = PRESETS[preset]
    per_layer = 12 * p.hidden * p.hidden  # qkv+out (4 h^2) + MLP (8 h^2)
    matmul_params = p.layers * per_layer + padded_vocab(vocab_size) * p.hidden
    return 6.0 * matmul_params * tokens + 12.0 * p.layers * p.hidden * pairs


def document_pairs(starts: torch.Tensor, window: int = 0) -> torch.Tensor:
    """Query-key pairs inside documents, summed over the rows: sum of n_d^2, or with an attention window w of
    n_d * min(n_d, w) (each query meets the w keys of its band; a 0-d tensor, on starts' device).
    starts: bool [batch, seq_len], True where a document begins (`DocumentMask.starts`)."""
    doc = torch.cumsum(starts.long(), dim=1)  # document number of each token within its row, from 1
    counts = torch.zeros(starts.shape[0], starts.shape[1] + 1, device=starts.device)
    counts.scatter_add_(1, doc, torch.ones_like(doc, dtype=counts.dtype))
    return (counts * (counts.clamp(max=window) if window else counts)).sum()


def position_ids(mode: str, batch: int, seq_len: int, final_len: int, generator: torch.Generator | None = None,
                 local: torch.Tensor | None = None) -> torch.Tensor | None:
    """Position ids [batch, seq_len] for a training batch of a stage with length `seq_len`.

    extrapolate: None (the model uses 0..seq_len-1, the paper's default).
    interpolate: 0..seq_len-1 stretched by final_len/seq_len (rounded down), spanning the final range.
    pose:        two chunks with a random skip between them (PoSE, Zhu et al. 2023) so that the ids cover up to
                 final_len - 1 while the sequence holds seq_len tokens; one draw per sequence.
    At the final length every mode gives ordinary positions (returned as None).
    local: with document masking, each token's position within its document ([batch, seq_len], from
    `document_mask`); the modes then apply per document (the same draws), and ids are always returned.
    """
    if mode not in POSITION_MODES:
        raise UserError(f"model.position_mode={mode!r} is not one of {' | '.join(POSITION_MODES)}")
    if mode == "extrapolate" or seq_len >= final_len:
        return local
    base = torch.arange(seq_len).unsqueeze(0).expand(batch, -1) if local is None else local
    if mode == "interpolate":
        return ((base * final_len) // seq_len).contiguous()
    cut = torch.randint(1, seq_len, (batch, 1), generator=generator).to(base.device)  # first chunk: [0, cut)
    skip = torch.randint(0, final_len - seq_len + 1, (batch, 1), generator=generator).to(base.device)
    return base + (base >= cut).long() * skip


@dataclass(frozen=True)
class DocumentMask:
    """The documents of a micro batch of packed rows (see the module docstring)."""

    starts: torch.Tensor  # bool [batch, seq_len]: the token begins a document (column 0 always does)
    positions: torch.Tensor  # long [batch, seq_len]: position of each token within its document
    model_kwargs: dict  # the backend's form of the block-diagonal causal mask, passed to the model


def document_mask(input_ids: torch.Tensor, eos_id: int | None, attention: str = "sdpa",
                  window: int = 0, device: torch.device | None = None) -> DocumentMask:
    """Documents of each row of input_ids [batch, seq_len]: a document ends with its EOS, the next starts after
    (eos_id None: the row is one document). window > 0: a query attends only to the `window` most recent keys
    of its document (itself included), the sliding-window mask of schedule.mode window.

    The documents are found where input_ids are (on the host, in training: no device sync, not even the flash
    path's lengths) and the mask is handed to `device` (default: input_ids'): per-token tensors by non-blocking
    copies, while the [batch, 1, q, kv] sdpa mask and flex's block mask are built on the device from the document
    ids (copying an L x L mask per row would cost more than building it)."""
    starts, doc, positions = _documents(input_ids, eos_id)
    return _mask_on(torch.device(device) if device is not None else input_ids.device, starts, doc, positions,
                    attention, window, one_doc_per_row=eos_id is None)


def _documents(input_ids: torch.Tensor, eos_id: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(starts bool, document number from 1, position within the document), each [batch, seq_len], where
    input_ids are."""
    batch, seq_len = input_ids.shape
    is_eos = input_ids == eos_id if eos_id is not None else torch.zeros_like(input_ids, dtype=torch.bool)
    starts = torch.zeros_like(is_eos)
    starts[:, 0] = True
    starts[:, 1:] = is_eos[:, :-1]
    doc = torch.cumsum(starts.long(), dim=1)
    idx = torch.arange(seq_len, device=input_ids.device).expand(batch, -1)
    positions = idx - torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return starts, doc, positions


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """t on device; from the host to a GPU through pinned memory, by a copy that does not block the host."""
    if t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


@functools.lru_cache(maxsize=16)
def causal_mask(seq_len: int, window: int, device: torch.device) -> torch.Tensor:
    """The bool [seq_len, seq_len] causal mask (True: attend), banded to `window` keys if window > 0: made once
    per stage (length, window) and device, not per micro batch."""
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).tril()
    return causal.triu(-(window - 1)) if window else causal


def _mask_on(device: torch.device, starts: torch.Tensor, doc: torch.Tensor, positions: torch.Tensor,
             attention: str, window: int, one_doc_per_row: bool) -> DocumentMask:
    batch, seq_len = starts.shape
    if attention == "flex":
        if one_doc_per_row:  # the causal (or banded) block mask every row shares, made once per stage
            kwargs = {"attention_mask": causal_block_mask(seq_len, window, device)}
        else:
            doc_d = to_device(doc, device)

            def same_doc_causal(b, h, q, kv):
                keep = (q >= kv) & (doc_d[b, q] == doc_d[b, kv])
                return keep & (q - kv < window) if window else keep

            kwargs = {"attention_mask": block_mask(same_doc_causal, batch, seq_len, device)}
    elif attention == "flash_attention_2":  # variable-length kernel over the flattened batch*seq_len tokens
        if window:
            raise UserError("an attention window needs model.attention sdpa or flex")
        flat_starts = torch.nonzero(starts.reshape(-1)).reshape(-1)  # on the host in training: no device sync
        cu = to_device(torch.cat([flat_starts, flat_starts.new_tensor([batch * seq_len])]).to(torch.int32), device)
        # cu's length is the documents + 1, different in every micro batch: a dynamic dimension for torch.compile,
        # and the row length as the longest document (an upper bound the kernel accepts): one graph per stage
        torch._dynamo.maybe_mark_dynamic(cu, 0)
        kwargs = {"attention_mask": None, "cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": seq_len,
                  "max_length_k": seq_len}
    else:  # sdpa: an explicit boolean [batch, 1, q, kv] mask (True: attend), used by transformers as given
        causal = causal_mask(seq_len, window, device)
        if one_doc_per_row:  # one [1, 1, q, kv] mask for every row
            kwargs = {"attention_mask": causal[None, None]}
        else:
            doc_d = to_device(doc, device)
            kwargs = {"attention_mask": ((doc_d[:, :, None] == doc_d[:, None, :]) & causal)[:, None]}
    return DocumentMask(starts=to_device(starts, device), positions=to_device(positions, device),
                        model_kwargs=kwargs)


def batch_inputs(x: torch.Tensor, *, position_mode: str, seq_len: int, final_len: int,
                 generator: torch.Generator | None = None, eos_id: int | None = None,
                 attention: str = "sdpa", window: int = 0, device: torch.device | None = None) -> dict:
    """Keyword arguments of lm_loss for a micro batch x [batch, seq_len]: position ids for the mode and, when
    `eos_id` is given (document masking) or a `window` (schedule.mode window), the mask in the form the
    attention backend takes. Computed where x is and handed to `device` (default: x's): training passes the
    host rows, so building them never waits for the device (see document_mask)."""
    device = torch.device(device) if device is not None else x.device
    # flex always gets a block mask: without one it would attend to every key, causal or not
    masked = eos_id is not None or 0 < window < seq_len or attention == "flex"
    if not masked:
        pos = position_ids(position_mode, x.shape[0], seq_len, final_len, generator)
        return {"pos": None if pos is None else to_device(pos, device), "docs": None}
    starts, doc, positions = _documents(x, eos_id)
    pos = position_ids(position_mode, x.shape[0], seq_len, final_len, generator, local=positions)
    docs = _mask_on(device, starts, doc, positions, attention, window if window < seq_len else 0,
                    one_doc_per_row=eos_id is None)
    if pos is positions:  # extrapolate (or the final length): the ids are the positions the mask already copied
        return {"pos": docs.positions, "docs": docs}
    return {"pos": None if pos is None else to_device(pos, device), "docs": docs}


def lm_forward(model: GPTNeoXForCausalLM, input_ids: torch.Tensor, pos: torch.Tensor | None = None,
               docs: DocumentMask | None = None):
    """The model's output, given labels, for a [batch, seq_len] block of tokens, and the scored targets bool
    [batch, seq_len - 1] (column t - 1 predicts token t). `.loss` is the mean next-token cross-entropy over the
    scored targets (seq_len - 1 per row; with `docs`, attention stays within documents and targets across a
    document boundary are left out). Training (`lm_loss`), validation and `gl-ray eval` all call the model here.

    With explicit position ids and no document mask we pass an all-ones attention mask: without one,
    transformers reads position ids that jump as packed sequences and would cut attention at every jump.
    """
    if docs is not None:
        labels = input_ids.masked_fill(docs.starts, -100)  # the label at t is the target of position t - 1
        out = model(input_ids=input_ids, position_ids=pos, labels=labels, use_cache=False, **docs.model_kwargs)
        return out, ~docs.starts[:, 1:]
    mask = None if pos is None else torch.ones_like(input_ids)
    out = model(input_ids=input_ids, position_ids=pos, attention_mask=mask, labels=input_ids, use_cache=False)
    return out, torch.ones_like(input_ids[:, 1:], dtype=torch.bool)


def lm_loss(model: GPTNeoXForCausalLM, input_ids: torch.Tensor, pos: torch.Tensor | None = None,
            docs: DocumentMask | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy over a [batch, seq_len] block of tokens (see lm_forward)."""
    return lm_forward(model, input_ids, pos, docs)[0].loss


def window_forward(model: GPTNeoXForCausalLM, x: torch.Tensor, *, eos_id: int | None = None,
                   attention: str = "sdpa"):
    """lm_forward of evaluation windows x [batch, L], each read from position 0 (with `eos_id`, masked by its
    documents as in training). `.loss * batch`, summed over batches and divided by the windows, is the window
    loss that validation during training and `gl-ray eval` both report."""
    L = x.shape[1]
    return lm_forward(model, x, **batch_inputs(x, position_mode="extrapolate", seq_len=L, final_len=L,
                                               eos_id=eos_id, attention=attention))
