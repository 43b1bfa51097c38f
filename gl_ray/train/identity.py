"""What a run is, so that a resume cannot quietly become another run.

    RUN/fingerprint.json     written at the first start: what must not change on resume (FINGERPRINT_KEYS, the
                             dataset's manifest digest, the global stage plan); if it is removed, the next
                             start recovers it from config.yaml and plan.json and checks against that
    RUN/config.yaml          the config of the first start, never overwritten
    RUN/config_history.jsonl one line per resume that changed an allowed key: {"time", "changed": {key: [old, new]}}

A resume may change what does not alter the data, the model or the step sequence: optim.* (the LR and the rest),
train.* (intervals, micro batch, loggers, precision, compile), ray.* sizes (workers, CPUs, GPUs: each step's rows
are the same whoever reads them), data.path (a copy of the same dataset), data.prefetch_batches, data.head_steps,
data.eval_tokens, model.attention (the kernel) and model.max_position_embeddings (RoPE has no table).
"""

from __future__ import annotations

import datetime
import hashlib
import json
from typing import TYPE_CHECKING

import yaml

from gl_ray import storage
from gl_ray.config import Config, config_from_dict, dump_config
from gl_ray.errors import UserError

if TYPE_CHECKING:
    from gl_ray.architectures import ModelSpec

GLOBAL_STAGE_KEYS = ("seq_len", "sequences_per_step", "steps", "tokens")  # what the data and the steps depend on
FINGERPRINT_KEYS = ("model.preset", "model.config", "model.rope_theta", "model.init_std", "model.position_mode",
                    "schedule.rope_theta",
                    "data.document_masking", "data.seed", "train.seed", "schedule.tokens_per_step",
                    "data.packing", "data.min_chunk", "data.curriculum", "data.bucket_odds", "data.cycles",
                    "data.stage_weights", "data.long_doc_boost", "data.long_doc_min")


def manifest_digest(manifest_bytes: bytes) -> str:
    """What a dataset holds, in 16 hex digits: the SHA-256 of its manifest.json."""
    return hashlib.sha256(manifest_bytes).hexdigest()[:16]


def fingerprint(cfg: Config, plan, manifest_bytes: bytes) -> dict:
    fp = {key: cfg.get(key) for key in FINGERPRINT_KEYS}
    fp["data.bucket_odds"] = {str(k): v for k, v in sorted(cfg.data.bucket_odds.items())}  # as JSON reads it back
    if cfg.data.sources:  # the mix and what each source holds (their paths may move, as data.path's may)
        fp["data.sources (weights)"] = [s.weight for s in cfg.data.sources]
        fp["data.sources (manifest.json digests)"] = [
            manifest_digest(storage.read_bytes(storage.join(s.path, "manifest.json"))) for s in cfg.data.sources]
    fp["dataset (manifest.json digest)"] = manifest_digest(manifest_bytes)
    fp["stages"] = stage_keys(plan.to_json()["stages"])
    return fp


def check_resumable(run_uri: str, cfg: Config, plan, manifest_bytes: bytes) -> None:
    """A rerun of an existing run goes on only as the same run (`recorded_fingerprint`) and with the strategy its
    checkpoints were written with; UserError naming the first difference otherwise."""
    from gl_ray.train.checkpoint import find_resume_checkpoint, strategy_mismatch

    old, new = recorded_fingerprint(run_uri, plan, manifest_bytes), fingerprint(cfg, plan, manifest_bytes)
    for key, value in new.items():
        if key in old and old[key] != value:
            what = "the stage plan" if key == "stages" else f"{key}={old[key]!r}"
            now = "another plan" if key == "stages" else repr(value)
            raise UserError(f"run {run_uri!r} was started with {what}; this config has {now}. A resume keeps "
                            "it (see gl_ray/train/identity.py for what may change); resume with the run's own "
                            "config.yaml or choose a new name")
    found = find_resume_checkpoint(run_uri, warn=lambda _: None)
    if found and found[1].strategy != cfg.ray.strategy:
        raise UserError(strategy_mismatch(found[0], found[1].strategy, cfg.ray.strategy))


def recorded_fingerprint(run_uri: str, plan, manifest_bytes: bytes) -> dict:
    """What a run was started as: RUN/fingerprint.json. Without it (removed, lost): the same keys of the run's own
    config.yaml and the stages of its plan.json (the dataset's digest cannot be recovered: fingerprint.json is
    rebuilt with this one), so that another model never resumes into the run; a run from before fingerprints:
    the stages of its plan.json. {} for a new run; UserError for a run that has begun (a checkpoint, model.json)
    with neither fingerprint.json nor config.yaml to tell what it trains."""
    from gl_ray.train.checkpoint import list_checkpoints

    fp_uri, cfg_uri = storage.join(run_uri, "fingerprint.json"), storage.join(run_uri, "config.yaml")
    if storage.exists(fp_uri):
        return _read_fingerprint(fp_uri)
    old: dict = {}
    if storage.exists(cfg_uri):
        old = fingerprint(_first_config(run_uri, cfg_uri), plan, manifest_bytes)
        del old["dataset (manifest.json digest)"], old["stages"]
    elif storage.exists(storage.join(run_uri, "model.json")) or list_checkpoints(run_uri):
        raise UserError(f"run {run_uri!r} has begun (a checkpoint or model.json) but has neither fingerprint.json "
                        "nor config.yaml to tell what it trains; restore them from a copy of the run, or choose a "
                        "new name")
    plan_uri = storage.join(run_uri, "plan.json")
    if storage.exists(plan_uri):
        old["stages"] = stage_keys(storage.read_json(plan_uri)["stages"])
    return old


def stage_keys(stages: list[dict]) -> list[dict]:
    """What a fingerprint keeps of plan.json's stages: what the data and the steps depend on."""
    return [{k: s.get(k) for k in GLOBAL_STAGE_KEYS} | ({"window": s["window"]} if "window" in s else {})
            for s in stages]


def _read_fingerprint(uri: str) -> dict:
    """RUN/fingerprint.json; UserError if it is torn (removing it is safe: `recorded_fingerprint` recovers it)."""
    try:
        fp = json.loads(storage.read_bytes(uri))
    except ValueError:  # JSONDecodeError, UnicodeDecodeError
        fp = None
    if not isinstance(fp, dict):
        raise UserError(f"{uri!r} is torn or not JSON; restore it from a copy of the run, or remove it: the next "
                        "start rebuilds it from the run's config.yaml and refuses a config that differs")
    return fp


def _first_config(run_uri: str, cfg_uri: str) -> Config:
    """The config of a run's first start, from its config.yaml (fingerprint keys never change on resume)."""
    try:
        return config_from_dict(yaml.safe_load(storage.read_bytes(cfg_uri)) or {})
    except (yaml.YAMLError, UnicodeDecodeError, UserError) as e:
        raise UserError(f"run {run_uri!r} has no fingerprint.json and its config.yaml cannot be read "
                        f"({str(e).splitlines()[0][:80]}); restore them from a copy of the run, or choose a new "
                        "name") from None


def flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def record_run(run_uri: str, cfg: Config, plan, manifest_bytes: bytes) -> dict:
    """First start: write fingerprint.json and config.yaml. A resume: append what changed to config_history.jsonl
    (config.yaml keeps the first start's). Returns the changes {key: [old, new]}."""
    fp_uri, cfg_uri = storage.join(run_uri, "fingerprint.json"), storage.join(run_uri, "config.yaml")
    if not storage.exists(fp_uri):
        storage.write_bytes(fp_uri, json.dumps(fingerprint(cfg, plan, manifest_bytes), indent=1).encode())
    if not storage.exists(cfg_uri):
        storage.write_bytes(cfg_uri, dump_config(cfg).encode())
        return {}
    first = flat(yaml.safe_load(storage.read_bytes(cfg_uri)) or {})
    history_uri = storage.join(run_uri, "config_history.jsonl")
    if storage.exists(history_uri):  # the config in force: the first, then every recorded change
        for line in storage.read_bytes(history_uri).decode().splitlines():
            try:
                first.update({k: v[1] for k, v in json.loads(line)["changed"].items()})
            except (json.JSONDecodeError, KeyError, TypeError, IndexError):
                continue
    now = flat(cfg.to_dict())
    changed = {k: [first.get(k), v] for k, v in now.items() if first.get(k) != v}
    if changed:
        append_history(run_uri, {"changed": changed})
    return changed


def append_history(run_uri: str, record: dict) -> None:
    """One line, with the time, at the end of RUN/config_history.jsonl (a resume's changes, a rewind)."""
    uri = storage.join(run_uri, "config_history.jsonl")
    line = json.dumps({"time": datetime.datetime.now().isoformat(timespec="seconds")} | record)
    old = storage.read_bytes(uri).decode() if storage.exists(uri) else ""
    storage.write_bytes(uri, (old + line + "\n").encode())


def run_model(run_uri: str, cfg: Config, manifest, final_len: int) -> ModelSpec:
    """The model a launch trains (gl_ray.architectures). A run that has RUN/model.json keeps it: the same preset or
    model.config folder must still describe the same architecture (another one is refused by the fingerprint),
    and model.init_from is not read again once a checkpoint exists (the checkpoint has the weights). Otherwise the
    config's model, checked against the dataset (an init_from folder's tokenizer must be the dataset's). Reads
    only; the driver writes RUN/model.json (`record_model`)."""
    from gl_ray.architectures import ModelSpec, spec_for
    from gl_ray.train.checkpoint import find_resume_checkpoint

    uri = storage.join(run_uri, "model.json")
    if storage.exists(uri):
        try:
            stored = ModelSpec.from_json(storage.read_json(uri))
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"{uri} is not a gl-ray model record ({e}); restore it from a copy or choose a new "
                            "run name") from None
        if not cfg.model.init_from:
            now = spec_for(cfg.model, vocab_size=manifest.vocab_size, eos_id=manifest.eos_token_id,
                           final_len=final_len)
            diff = sorted(k for k in set(now.config) | set(stored.config) if k != "max_position_embeddings"
                          and now.config.get(k) != stored.config.get(k))
            if diff and now.source == stored.source:  # another preset or path: the fingerprint says so, by key
                raise UserError(f"run {run_uri!r} trains {stored.source}; this config's {now.source} differs in "
                                f"{', '.join(diff[:4])}. Resume with the run's own config.yaml or choose a new name")
        has_checkpoint = find_resume_checkpoint(run_uri, warn=lambda _: None) is not None
        return stored.without_weights() if has_checkpoint or not stored.init_from else stored
    spec = spec_for(cfg.model, vocab_size=manifest.vocab_size, eos_id=manifest.eos_token_id, final_len=final_len)
    if spec.init_from:
        from gl_ray.data.tokenizer import check_same_tokenizer

        check_same_tokenizer(storage.read_bytes(storage.join(manifest.tokenizer_uri, "tokenizer.json")).decode(),
                             spec.init_from)
    return spec


def record_model(run_uri: str, spec: ModelSpec) -> None:
    """RUN/model.json at a run's first start (never overwritten)."""
    uri = storage.join(run_uri, "model.json")
    if not storage.exists(uri):
        storage.write_bytes(uri, json.dumps(spec.to_json(), indent=1).encode())
