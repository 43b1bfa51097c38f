"""Which model a run trains: a named preset, a Hugging Face config folder (model.config) or an HF model folder
with weights (model.init_from), for the RoPE decoder families transformers ships. Single-device code: torch and
transformers only.

    spec = model_spec(preset="tiny-llama", vocab_size=8192, eos_id=0, max_positions=2048)
    spec = model_spec(config="path/to/folder", vocab_size=8192, eos_id=0, max_positions=4096)   # config.json
    spec = model_spec(init_from="runs/demo/final", vocab_size=8192, eos_id=0, max_positions=4096)  # + weights
    hf = spec.hf_config("sdpa")      # a transformers config of the family, ready for gl_ray.model.build_model
    spec.shape.params                # parameters; spec.shape feeds FLOPs and memory (model_shape)

A spec is plain JSON (`to_json` / `from_json`): the driver writes it to RUN/model.json at a run's first start and
every worker and every resume builds the model from that record, so a resume never depends on the folder it came
from.

What the position modes do to each family's RoPE: every family here computes its rotary angles as position id x
inv_freq, inv_freq set by rope_theta and the config's rope type (default, linear, llama3, yarn, ...), from the
position ids gl-ray passes. So extrapolate passes 0..n-1 (the family's own positions); interpolate passes
0..n-1 x final/seq_len (floored), which on top of any rope scaling stretches the short stage's positions over
the final range; PoSE passes two chunks with a skip; document masking restarts them per document. What differs:
    gpt_neox  rotates partial_rotary_factor of each head (0.25 in Pythia); the rest carries no position.
    llama     the whole head; a "llama3" rope type scales low frequencies from the positions given (Llama 3.1).
    mistral   the whole head; a sliding window shorter than the final length is refused (gl-ray's masks are
              full causal or its own schedule.mode window).
    qwen2     like mistral (use_sliding_window must be off, or the window at least the final length).
    qwen3     the whole head, after a norm of q and k; like qwen2 for windows.
A "dynamic" rope type rescales from the largest position id a batch holds, so interpolate and PoSE (ids up to the
final length) make it scale in short stages too. schedule.rope_theta (ABF, one base per stage) sets rope_theta
before each stage; the exported model keeps the last stage's.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoConfig, GPTNeoXConfig, LlamaConfig, PretrainedConfig

from gl_ray.config import ModelConfig
from gl_ray.errors import UserError

FAMILIES = ("gpt_neox", "llama", "mistral", "qwen2", "qwen3")  # RoPE decoders gl-ray trains (model_type)
DEFAULT_ROPE_THETA = 10000.0  # model.rope_theta's default: a loaded config keeps its own base unless it is set


@dataclass(frozen=True)
class Preset:
    family: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int = 0  # grouped-query attention (llama); 0: as many as heads


# Pythia sizes (Biderman et al. 2023) plus two CPU-sized ones: rotary pct 0.25, parallel residual, untied
# embeddings, MLP 4x hidden. tiny-llama: a Llama (2/3) shape at CPU size: RMSNorm, SwiGLU MLP (8/3 x hidden),
# grouped-query attention, RoPE on the whole head.
PRESETS: dict[str, Preset] = {
    "tiny": Preset("gpt_neox", 2, 64, 4),
    "tiny-llama": Preset("llama", 2, 64, 4, kv_heads=2),
    "pythia-14m": Preset("gpt_neox", 6, 128, 4),
    "pythia-31m": Preset("gpt_neox", 6, 256, 8),
    "pythia-70m": Preset("gpt_neox", 6, 512, 8),
    "pythia-160m": Preset("gpt_neox", 12, 768, 12),
    "pythia-410m": Preset("gpt_neox", 24, 1024, 16),
}


def padded_vocab(vocab_size: int, multiple: int = 128) -> int:
    """Embedding rows: the tokenizer's vocab padded up to a multiple of 128 (Pythia pads 50277 to 50304)."""
    return -(-vocab_size // multiple) * multiple


def check_preset(preset: str, what: str = "model.preset") -> Preset:
    """The preset of that name; UserError naming `what` (the config key or flag) if there is none."""
    if preset not in PRESETS:
        raise UserError(f"{what} {preset!r} unknown; choose one of {', '.join(PRESETS)}")
    return PRESETS[preset]


def preset_config(preset: str, vocab_size: int, max_position_embeddings: int, rope_theta: float = DEFAULT_ROPE_THETA,
                  init_std: float = 0.02, eos_token_id: int = 0) -> PretrainedConfig:
    """The transformers config of a preset. RoPE has no position table: max_position_embeddings only records the
    longest length trained or meant."""
    p = check_preset(preset)
    common = dict(vocab_size=padded_vocab(vocab_size), hidden_size=p.hidden, num_hidden_layers=p.layers,
                  num_attention_heads=p.heads, max_position_embeddings=max_position_embeddings,
                  tie_word_embeddings=False, attention_dropout=0.0, initializer_range=init_std,
                  bos_token_id=eos_token_id, eos_token_id=eos_token_id, use_cache=False)
    if p.family == "llama":
        return LlamaConfig(**common, num_key_value_heads=p.kv_heads or p.heads,
                           intermediate_size=-(-8 * p.hidden // 3 // 16) * 16,  # 8/3 x hidden, up to 16
                           rope_parameters={"rope_type": "default", "rope_theta": rope_theta}, rms_norm_eps=1e-5)
    return GPTNeoXConfig(**common, intermediate_size=4 * p.hidden, use_parallel_residual=True, hidden_dropout=0.0,
                         rope_parameters={"rope_type": "default", "rope_theta": rope_theta,
                                          "partial_rotary_factor": 0.25})


@dataclass(frozen=True)
class ModelShape:
    """What FLOPs and memory need of a model: blocks, attention width (heads x head dim), the parameters of its
    matmuls (blocks and unembedding: PaLM's N) and all its parameters."""

    layers: int
    attention_width: int
    matmul_params: int
    params: int


@functools.lru_cache(maxsize=32)
def _shape_of_json(config_json: str) -> ModelShape:
    from transformers import AutoModelForCausalLM

    d = json.loads(config_json)
    cfg = AutoConfig.for_model(d.pop("model_type"), **d)
    with torch.device("meta"):  # no memory, no init: only the parameter shapes
        model = AutoModelForCausalLM.from_config(cfg)
    model.tie_weights()  # transformers 5.0 leaves a meta-device copy untied (later versions tie in from_config)
    blocks = getattr(model, model.base_model_prefix).layers
    linear = sum(m.weight.numel() for m in blocks.modules() if isinstance(m, torch.nn.Linear))
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    # parameters shared by tied embeddings count once (model.parameters() yields each once)
    return ModelShape(layers=cfg.num_hidden_layers, attention_width=cfg.num_attention_heads * head_dim,
                      matmul_params=linear + model.get_output_embeddings().weight.numel(),
                      params=sum(p.numel() for p in model.parameters()))


def model_shape(hf_config: PretrainedConfig) -> ModelShape:
    """The ModelShape of a transformers config (measured on a meta-device copy of the model; cached)."""
    return _shape_of_json(hf_config.to_json_string(use_diff=False))


@dataclass(frozen=True)
class ModelSpec:
    """A run's model: its transformers config as JSON (`config`: model_type and the rest), where it came from, and
    the weights to start from (`init_from`, an HF folder; empty: a fresh init by train.seed)."""

    config: dict
    source: str  # "preset NAME", "config PATH" or "init_from PATH"
    init_from: str = ""
    trained_len: int = 0  # init_from: the length its config says it was made for (max_position_embeddings)
    shape: ModelShape = field(init=False, compare=False, repr=False)

    def __post_init__(self):
        object.__setattr__(self, "shape", model_shape(self.hf_config("sdpa")))

    @property
    def family(self) -> str:
        return self.config["model_type"]

    def hf_config(self, attention: str) -> PretrainedConfig:
        """A fresh transformers config of the model, with `attention` (gl_ray.attention's config name or a stock
        one) as its attention implementation."""
        d = dict(self.config)
        cfg = AutoConfig.for_model(d.pop("model_type"), **d)
        cfg._attn_implementation = attention
        cfg.use_cache = False  # training and loss evaluation only; generate() turns the cache on itself
        return cfg

    def summary(self) -> dict:
        """What plan.json and `gl-ray plan --json` say of the model."""
        return {"family": self.family, "source": self.source, "params": self.shape.params,
                "init_from": self.init_from}

    def to_json(self) -> dict:
        return {"config": self.config, "source": self.source, "init_from": self.init_from,
                "trained_len": self.trained_len}

    @classmethod
    def from_json(cls, d: dict) -> ModelSpec:
        return cls(config=d["config"], source=d["source"], init_from=d.get("init_from", ""),
                   trained_len=d.get("trained_len", 0))

    def without_weights(self) -> ModelSpec:
        """The same model, freshly initialised (a resume: its checkpoint has the weights)."""
        return ModelSpec(config=self.config, source=self.source, trained_len=self.trained_len)


def config_json(cfg: PretrainedConfig) -> dict:
    """A transformers config as plain JSON, without what a run sets itself (attention kernel, cache, dtype)."""
    d = cfg.to_dict()
    for key in ("_attn_implementation_autoset", "attn_implementation", "_name_or_path", "transformers_version",
                "use_cache", "architectures", "dtype", "torch_dtype", "id2label", "label2id"):
        d.pop(key, None)
    return json.loads(json.dumps(d))  # as RUN/model.json reads it back


def model_spec(*, preset: str = "tiny", config: str = "", init_from: str = "", vocab_size: int, eos_id: int,
               max_positions: int, final_len: int = 0, rope_theta: float = DEFAULT_ROPE_THETA,
               init_std: float = 0.02) -> ModelSpec:
    """The model of model.preset, model.config or model.init_from (the one given; init_from wins, then config),
    for a dataset of `vocab_size` tokens; UserError in one line if it is not a RoPE decoder gl-ray can train on it.
    max_positions: model.max_position_embeddings (recorded as the config's, where the rope type does not read it);
    final_len: the last stage length (a sliding window must not be shorter); rope_theta: model.rope_theta (a
    loaded config keeps its own unless this is not the default)."""
    if config and init_from:
        raise UserError("model.config and model.init_from both given: init_from's folder has the config; give one")
    if not (config or init_from):
        return ModelSpec(config=config_json(preset_config(preset, vocab_size, max_positions, rope_theta, init_std,
                                                          eos_id)), source=f"preset {preset}")
    key, name = ("model.init_from", init_from) if init_from else ("model.config", config)
    folder = local_folder(name, key)
    cfg = load_folder_config(folder, key)
    check_family(cfg, key, folder, final_len)
    if cfg.vocab_size < vocab_size:
        raise UserError(f"{key} {folder!r} has vocab_size {cfg.vocab_size}, fewer than the dataset's {vocab_size} "
                        "tokens: the tokenizer must be the model's (or raise vocab_size in config.json)")
    trained = cfg.max_position_embeddings if init_from else 0  # the length the folder's model was made for
    rope = dict(cfg.rope_parameters)
    if rope_theta != DEFAULT_ROPE_THETA:
        rope["rope_theta"] = rope_theta
    cfg.rope_parameters = rope
    if rope.get("rope_type", "default") in ("default", "linear"):  # there it is only a record
        cfg.max_position_embeddings = max(cfg.max_position_embeddings, max_positions)
    return ModelSpec(config=config_json(cfg), source=f"{key.split('.')[1]} {name}",
                     init_from=folder if init_from else "", trained_len=trained)


def local_folder(name: str, key: str) -> str:
    """A local folder: `name` itself, or the snapshot of a hub name (org/model) in the local Hugging Face cache;
    nothing is downloaded. UserError naming `key` otherwise."""
    if Path(name).is_dir():
        return name
    if name.count("/") == 1 and not Path(name).exists():
        from huggingface_hub import snapshot_download

        try:
            return snapshot_download(name, local_files_only=True)
        except Exception:  # not cached (LocalEntryNotFoundError), or not a valid repo id
            pass
    raise UserError(f"{key} {name!r} is not a folder, nor a model in the local Hugging Face cache (gl-ray downloads "
                    "nothing: give a local folder with an HF config.json)")


def load_folder_config(folder: str, key: str) -> PretrainedConfig:
    """The transformers config of a local HF folder (config.json); UserError naming `key`."""
    path = Path(folder)
    if not (path / "config.json").is_file():
        raise UserError(f"{key} {folder!r} has no config.json (give a save_pretrained folder or one holding an "
                        "HF config.json)")
    try:
        return AutoConfig.from_pretrained(folder, local_files_only=True)
    except (ValueError, KeyError, OSError, json.JSONDecodeError) as e:
        raise UserError(f"{key} {folder!r}: config.json cannot be read: {str(e).splitlines()[0][:200]}") from None


def check_family(cfg: PretrainedConfig, key: str, folder: str, final_len: int) -> None:
    """UserError unless `cfg` is a RoPE decoder of FAMILIES whose attention gl-ray's masks reproduce."""
    kind = getattr(cfg, "model_type", "?")
    if kind not in FAMILIES:
        rope = "a RoPE decoder" if getattr(cfg, "rope_parameters", None) else "a model without RoPE"
        raise UserError(f"{key} {folder!r} is {rope} of type {kind!r}; gl-ray trains the RoPE decoders "
                        f"{' | '.join(FAMILIES)}")
    window = getattr(cfg, "sliding_window", None)
    sliding = "sliding_attention" in (getattr(cfg, "layer_types", None) or []) or (kind == "mistral" and window)
    if sliding and window and final_len and window < final_len:
        raise UserError(f"{key} {folder!r} has a sliding window of {window} tokens, shorter than the final length "
                        f"{final_len}; gl-ray trains full causal attention (or schedule.mode window): set "
                        "sliding_window to null (use_sliding_window false) in config.json")
    theta = (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta")
    if not isinstance(theta, (int, float)) or not math.isfinite(theta) or theta <= 0:
        raise UserError(f"{key} {folder!r} has no usable rope_theta ({theta!r})")


def spec_for(m: ModelConfig, *, vocab_size: int, eos_id: int, final_len: int) -> ModelSpec:
    """model_spec of a config's model section, for a dataset of vocab_size tokens and a plan ending at final_len."""
    return model_spec(preset=m.preset, config=m.config, init_from=m.init_from, vocab_size=vocab_size, eos_id=eos_id,
                      max_positions=m.max_position_embeddings, final_len=final_len, rope_theta=m.rope_theta,
                      init_std=m.init_std)


def model_line(spec: ModelSpec, first_len: int) -> str:
    """The line printed with the plan: family, source, size, and for init_from where the stages start from."""
    line = f"model: {spec.family} ({spec.source}), {spec.shape.params / 1e6:.1f}M parameters"
    if spec.init_from:
        line += f"; made for {spec.trained_len} tokens, stages from {first_len}" if spec.trained_len else ""
        if spec.trained_len and first_len < spec.trained_len:
            line += " (shorter: GrowLength usually continues from the trained length upward)"
    return line
