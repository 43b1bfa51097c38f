"""Tokenizers for `gl-ray prepare`: train a byte-level BPE on the corpus, or load an HF tokenizer.

SPEC: `train:VOCAB` (byte-level BPE with <|endoftext|> = 0 and <|padding|> = 1, like GPT-NeoX), a local HF
tokenizer folder, or a hub name (loaded with AutoTokenizer; needs network).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from gl_ray.errors import UserError

EOS, PAD = "<|endoftext|>", "<|padding|>"


def train_bpe(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    if vocab_size < 300:
        raise UserError(f"--tokenizer train:{vocab_size}: vocab must be at least 300 (256 bytes + merges)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS, PAD], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=EOS,
                                   pad_token=PAD)


def load_tokenizer(spec: str) -> PreTrainedTokenizerFast:
    """A local folder or hub name; must be a fast tokenizer with an EOS token."""
    try:
        tok = AutoTokenizer.from_pretrained(spec)
    except Exception as e:  # transformers raises OSError/ValueError/HTTP errors for a bad name or folder
        where = "folder" if Path(spec).exists() else "name (local folder not found; hub unreachable or unknown)"
        raise UserError(f"cannot load tokenizer {spec!r}: bad {where}: {str(e).splitlines()[0][:200]}") from None
    if not getattr(tok, "is_fast", False):
        raise UserError(f"tokenizer {spec!r} is not a fast (tokenizers-backed) tokenizer")
    if tok.eos_token_id is None:
        raise UserError(f"tokenizer {spec!r} has no eos token; every document must end with one")
    return tok


_BACKENDS: dict[int, Tokenizer] = {}


def encode_documents(texts: list[str], tokenizer_json: str, eos_id: int) -> list[np.ndarray]:
    """Token ids (int32) of each text with EOS appended. Caches the backend per process."""
    key = hash(tokenizer_json)
    if key not in _BACKENDS:
        _BACKENDS[key] = Tokenizer.from_str(tokenizer_json)
    encs = _BACKENDS[key].encode_batch(texts, add_special_tokens=False)
    return [np.array(e.ids + [eos_id], dtype=np.int32) for e in encs]


PROBES = ("Hello, world!", "def grow(length: int) -> int:\n    return 2 * length", "  naïve café 1234567890 <|x|>",
          "GrowLength trains short rows first.\n\nThen longer ones.")


def check_same_tokenizer(dataset_tokenizer_json: str, model_folder: str, what: str = "model.init_from") -> None:
    """UserError unless the model folder's tokenizer (tokenizer.json) is the dataset's: the same vocab size and the
    same ids for a few probe texts. dataset_tokenizer_json: the dataset tokenizer's tokenizer.json text."""
    path = Path(model_folder) / "tokenizer.json"
    if not path.is_file():
        raise UserError(f"{what} {model_folder!r} has no tokenizer.json: gl-ray checks that the dataset was "
                        "tokenized with the model's tokenizer (save the tokenizer into the folder)")
    ours, theirs = Tokenizer.from_str(dataset_tokenizer_json), Tokenizer.from_file(str(path))
    n_ours, n_theirs = ours.get_vocab_size(with_added_tokens=True), theirs.get_vocab_size(with_added_tokens=True)
    if n_ours != n_theirs:
        raise UserError(f"{what} {model_folder!r} has a tokenizer of {n_theirs} tokens, the dataset's has {n_ours}: "
                        "prepare the data with the model's tokenizer (gl-ray prepare --tokenizer FOLDER)")
    for text in PROBES:
        a, b = ours.encode(text, add_special_tokens=False).ids, theirs.encode(text, add_special_tokens=False).ids
        if a != b:
            raise UserError(f"{what} {model_folder!r} tokenizes {text[:24]!r} as {b[:6]}..., the dataset's tokenizer "
                            f"as {a[:6]}...: prepare the data with the model's tokenizer (--tokenizer FOLDER)")
