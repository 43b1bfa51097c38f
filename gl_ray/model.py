"""RoPE decoder models (Pythia presets, or any family of gl_ray.architectures), GrowLength position ids and
document masks. Single-device code: torch and transformers only.

    model = build_model("pythia-70m", vocab_size=50277, max_position_embeddings=2048, attention="sdpa")
    model = build_from_spec(model_spec(config="my-llama/", ...), attention="sdpa", seed=0)   # any family
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
from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, GPTNeoXConfig, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from gl_ray.architectures import (  # noqa: F401 (the presets are the model's public names too)
    PRESETS,
    ModelShape,
    ModelSpec,
    Preset,
    check_preset,
    model_shape,
    padded_vocab,
    preset_config,
)
from gl_ray.attention import block_mask, causal_block_mask, check_attention
from gl_ray.errors import UserError
from gl_ray.loss import linear_cross_entropy

POSITION_MODES = ("extrapolate", "interpolate", "pose")


def model_config(preset: str, vocab_size: int, max_position_embeddings: int, rope_theta: float = 10000.0,
                 init_std: float = 0.02, eos_token_id: int = 0, attention: str = "sdpa") -> PretrainedConfig:
    """The transformers config of a preset (gl_ray.architectures.preset_config) with the attention backend set."""
    cfg = preset_config(preset, vocab_size, max_position_embeddings, rope_theta, init_std, eos_token_id)
    cfg._attn_implementation = check_attention(attention)
    return cfg


class GrowLengthMixin:
    """A causal LM whose forward with `labels` returns only the loss, computed by gl_ray.loss.linear_cross_entropy
    from the last hidden states: the [tokens, vocab] logits never exist whole (no fp32 copy of them either).
    Without labels it is the stock forward (logits for eval and generation). Mixed into the family's own class
    (`lm_class`): the same modules and state dict; a run's final/ folder is saved as the stock class."""

    def forward(self, input_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None, **kwargs):
        if labels is None:
            return super().forward(input_ids=input_ids, **kwargs)
        base = getattr(self, self.base_model_prefix)  # the decoder stack: gpt_neox, model, ...
        hidden = base(input_ids, **kwargs).last_hidden_state  # [batch, seq_len, hidden]
        h = hidden[:, :-1].reshape(-1, hidden.shape[-1])  # position t predicts the label at t + 1 (HF's shift)
        loss = linear_cross_entropy(h, self.get_output_embeddings().weight, labels[:, 1:].reshape(-1))
        return CausalLMOutputWithPast(loss=loss)


@functools.cache
def lm_class(config_class: type) -> type[PreTrainedModel]:
    """GrowLengthMixin over the family's causal LM class (GPTNeoXForCausalLM, LlamaForCausalLM, ...)."""
    stock = MODEL_FOR_CAUSAL_LM_MAPPING[config_class]
    cls = type(f"GrowLength{stock.__name__}", (GrowLengthMixin, stock), {"__module__": __name__})
    globals()[cls.__name__] = cls  # found by name, as pickle looks a class up
    return cls


GrowLengthLM = lm_class(GPTNeoXConfig)  # the Pythia presets' family


def build_model(preset: str, vocab_size: int, max_position_embeddings: int, rope_theta: float = 10000.0,
                init_std: float = 0.02, eos_token_id: int = 0, seed: int = 0, *, attention: str = "sdpa",
                activation_checkpointing: bool = False) -> PreTrainedModel:
    """A freshly initialised model of a preset; the same seed gives the same weights (whatever the attention
    backend). activation_checkpointing: see build_from_spec."""
    cfg = model_config(preset, vocab_size, max_position_embeddings, rope_theta, init_std, eos_token_id, attention)
    return _finish(_fresh(cfg, seed), activation_checkpointing)


def build_from_spec(spec: ModelSpec, *, attention: str = "sdpa", seed: int = 0,
                    activation_checkpointing: bool = False) -> PreTrainedModel:
    """The model of a run's spec (gl_ray.architectures): its init_from weights (fp32), else a fresh init by `seed`.

    activation_checkpointing: recompute each transformer block's activations in the backward pass instead of
    keeping them (less memory, about one more forward pass of compute); gradients are unchanged."""
    cfg = spec.hf_config(check_attention(attention))
    if not spec.init_from:
        return _finish(_fresh(cfg, seed), activation_checkpointing)
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a bar per load in every worker's output otherwise
    # the stock loader (its key renames for old checkpoints, sharded safetensors, tied weights), in fp32 master
    # weights; then the same object as gl-ray's class (which adds only the loss-only forward)
    model, info = AutoModelForCausalLM.from_pretrained(spec.init_from, config=cfg, dtype=torch.float32,
                                                       local_files_only=True, output_loading_info=True)
    if info["missing_keys"] or info.get("mismatched_keys"):
        bad = sorted(info["missing_keys"]) or [str(m[0] if isinstance(m, tuple) else m)
                                               for m in info["mismatched_keys"]]
        raise UserError(f"model.init_from {spec.init_from!r}: its weights do not fit its config.json "
                        f"({'missing' if info['missing_keys'] else 'mismatched'}: {', '.join(bad[:3])})")
    model.__class__ = lm_class(type(cfg))
    return _finish(model, activation_checkpointing)


def _fresh(cfg: PretrainedConfig, seed: int) -> PreTrainedModel:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return lm_class(type(cfg))(cfg)


def _finish(model: PreTrainedModel, activation_checkpointing: bool) -> PreTrainedModel:
    if activation_checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5
        if enable is not None:
            enable()
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def set_rope_theta(model: PreTrainedModel, theta: float) -> None:
    """Set the RoPE base of a live model (schedule.rope_theta, adjusted base frequency per stage): its config and
    every rotary module's inverse frequencies, in place (same shapes: no recompile, FSDP leaves buffers whole)."""
    rope = dict(model.config.rope_parameters)
    if rope.get("rope_theta") == theta:
        return
    rope["rope_theta"] = theta
    model.config.rope_parameters = rope
    for module in model.modules():
        if isinstance(getattr(module, "inv_freq", None), torch.Tensor) and hasattr(module, "config"):
            module.config.rope_parameters = rope
            with torch.device("cpu"):
                fresh = type(module)(module.config)  # the family's own init: partial rotary, rope type
            with torch.no_grad():
                module.inv_freq.copy_(fresh.inv_freq)
                if isinstance(getattr(module, "original_inv_freq", None), torch.Tensor):
                    module.original_inv_freq.copy_(fresh.inv_freq)


def flops_per_token(shape: ModelShape, seq_len: int, keys_per_token: float | None = None) -> float:
    """Training FLOPs per token (forward + backward = 3x forward), PaLM's accounting (Chowdhery et al. 2022,
    appendix B): 6 * N + 12 * layers * width * T, N the matmul parameters (blocks + unembedding), width the
    attention's (heads x head dim; the hidden size in Pythia).

    T is the keys each query is counted against: seq_len for a dense row (PaLM counts the whole T x T score
    matrix); with document masking only pairs inside documents are attended, so T is their number per token,
    sum of n_d^2 over the row's documents / seq_len (`document_pairs`)."""
    return training_flops(shape, tokens=1, pairs=seq_len if keys_per_token is None else keys_per_token)


def training_flops(shape: ModelShape, tokens, pairs):
    """FLOPs to train on `tokens` tokens whose queries meet `pairs` keys in all (numbers or tensors): 6 N tokens
    + 12 layers width pairs, the accounting of flops_per_token."""
    return 6.0 * shape.matmul_params * tokens + 12.0 * shape.layers * shape.attention_width * pairs


def preset_shape(preset: str, vocab_size: int) -> ModelShape:
    """The ModelShape of a preset for a tokenizer of vocab_size tokens."""
    return model_shape(preset_config(preset, vocab_size, 2048))


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


def lm_forward(model: PreTrainedModel, input_ids: torch.Tensor, pos: torch.Tensor | None = None,
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


def lm_loss(model: PreTrainedModel, input_ids: torch.Tensor, pos: torch.Tensor | None = None,
            docs: DocumentMask | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy over a [batch, seq_len] block of tokens (see lm_forward)."""
    return lm_forward(model, input_ids, pos, docs)[0].loss


def window_forward(model: PreTrainedModel, x: torch.Tensor, *, eos_id: int | None = None,
                   attention: str = "sdpa"):
    """lm_forward of evaluation windows x [batch, L], each read from position 0 (with `eos_id`, masked by its
    documents as in training). `.loss * batch`, summed over batches and divided by the windows, is the window
    loss that validation during training and `gl-ray eval` both report."""
    L = x.shape[1]
    return lm_forward(model, x, **batch_inputs(x, position_mode="extrapolate", seq_len=L, final_len=L,
                                               eos_id=eos_id, attention=attention))
