"""Bring your own model (gl_ray.architectures): any RoPE decoder family from a config folder, continued pretraining
from an HF folder's weights, and a RoPE base per stage. Tiny configs are saved to temp folders; nothing is
downloaded."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import NEOX_TOKENIZER, cli_inprocess, metrics, run_tiny, tiny_overrides, weights
from test_model import EOS, packed_row, summed_loss

from gl_ray.architectures import ModelSpec, model_line, model_spec
from gl_ray.errors import UserError
from gl_ray.model import build_from_spec, document_mask, lm_loss, position_ids, set_rope_theta, training_flops
from gl_ray.train.faults import InjectedFault

SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
             max_position_embeddings=64, vocab_size=1024)


def family_config(family: str, **extra):
    """A CPU-sized transformers config of a family (vocab 1024: the test dataset's tokenizer fits)."""
    from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    if family == "gpt2":
        return GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=1024, **extra)
    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config,
           "gpt_neox": GPTNeoXConfig}[family]
    kv = {} if family == "gpt_neox" else {"num_key_value_heads": 2}
    window = {"sliding_window": None} if family == "mistral" else {}
    tie = {"tie_word_embeddings": True} if family.startswith("qwen") else {}  # small Qwens tie the embeddings
    return cls(**SMALL | kv | window | tie | extra)


def save_config(folder: Path, family: str, **extra) -> str:
    family_config(family, **extra).save_pretrained(folder)
    return str(folder)


FAMILIES = ["gpt_neox", "llama", "mistral", "qwen2", "qwen3"]


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_trains_packed_documents_exactly_as_alone(family, tmp_path):
    """The document mask and per-document positions reach every family's attention and rotary embedding: a packed,
    masked row's summed loss and gradients equal its documents run one by one (PoSE positions: a skip inside)."""
    spec = model_spec(config=save_config(tmp_path, family), vocab_size=256, eos_id=EOS, max_positions=128)
    model = build_from_spec(spec, seed=0).train()
    x, docs_alone = packed_row([9, 14, 5, 4])

    def draw(local):
        return position_ids("pose", 1, 32, 128, torch.Generator().manual_seed(7), local=local)

    docs = document_mask(x, EOS)
    packed = summed_loss(model, x, draw(docs.positions), docs)
    packed.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    alone, offset = torch.zeros(()), 0
    for d in docs_alone:
        alone = alone + summed_loss(model, d.unsqueeze(0), draw(docs.positions)[:, offset: offset + len(d)])
        offset += len(d)
    alone.backward()
    assert packed.item() == pytest.approx(alone.item(), rel=1e-6)
    for n, p in model.named_parameters():
        assert torch.allclose(grads[n], p.grad, atol=1e-5), n


@pytest.mark.parametrize("family", FAMILIES)
def test_position_ids_drive_each_familys_rope(family, tmp_path):
    """RoPE is relative: shifting every position id leaves the logits unchanged, interpolating (scaling) them does
    not. Both only hold if the family's rotary embedding reads the ids gl-ray passes (as lm_forward passes them)."""
    folder = save_config(tmp_path, family, initializer_range=0.3)  # sharp attention: positions show in the logits
    model = build_from_spec(model_spec(config=folder, vocab_size=256, eos_id=EOS, max_positions=512), seed=0).eval()
    x = torch.randint(1, 256, (2, 32), generator=torch.Generator().manual_seed(0))

    def logits(pos):
        return model(input_ids=x, position_ids=pos, attention_mask=torch.ones_like(x)).logits

    with torch.no_grad():
        plain = logits(torch.arange(32).expand(2, -1))
        shifted = logits(torch.arange(32).expand(2, -1) + 100)
        stretched = logits(position_ids("interpolate", 2, 32, 512))
    scale = plain.abs().max()
    assert (shifted - plain).abs().max() < 1e-4 * scale
    assert (stretched - plain).abs().max() > 1e-2 * scale


def test_shapes_count_each_familys_matmuls(tmp_path):
    """FLOPs use the family's own matmuls: Llama's grouped-query k/v and gated MLP, Qwen's tied unembedding."""
    llama = model_spec(config=save_config(tmp_path / "l", "llama"), vocab_size=1000, eos_id=0, max_positions=64)
    h, kv, i, v = 64, 2 * 16, 128, 1024  # 2 kv heads of 16 dims
    per_layer = h * h + 2 * h * kv + h * h + 3 * h * i  # q, k and v, o, gate/up/down
    assert llama.shape.matmul_params == 2 * per_layer + v * h
    assert training_flops(llama.shape, 1, 0) == 6 * llama.shape.matmul_params
    assert training_flops(llama.shape, 0, 100) == 12 * 2 * h * 100
    qwen = model_spec(config=save_config(tmp_path / "q", "qwen2"), vocab_size=1000, eos_id=0, max_positions=64)
    model = build_from_spec(qwen)
    assert qwen.shape.params == sum(p.numel() for p in model.parameters())  # the tied matrix once
    assert qwen.shape.matmul_params == llama.shape.matmul_params  # the unembedding is a matmul, tied or not


@pytest.mark.parametrize("family", ["gpt_neox", "llama"])
def test_a_new_rope_base_equals_a_model_built_with_it(family, tmp_path):
    """set_rope_theta (schedule.rope_theta) gives the logits of the same weights built with that base, including
    GPT-NeoX's partial rotary dimensions."""
    folder = save_config(tmp_path, family)
    a = build_from_spec(model_spec(config=folder, vocab_size=256, eos_id=0, max_positions=64), seed=3).eval()
    b = build_from_spec(model_spec(config=folder, vocab_size=256, eos_id=0, max_positions=64, rope_theta=5e5),
                        seed=3).eval()
    x = torch.randint(1, 256, (1, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = a(input_ids=x).logits
        set_rope_theta(a, 5e5)
        assert not torch.allclose(before, a(input_ids=x).logits, atol=1e-4)
        assert torch.allclose(a(input_ids=x).logits, b(input_ids=x).logits, atol=1e-5)
    assert a.config.rope_parameters["rope_theta"] == 5e5


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_checkpointing_and_compile_keep_each_familys_loss_and_gradients(family, tmp_path):
    """Activation checkpointing and torch.compile (one graph, counted) on a family's model: the loss and the
    gradients of the plain model (Qwen3: tied embeddings, so the chunked loss reads the embedding matrix)."""
    from torch._dynamo.testing import CompileCounter

    from gl_ray.train.compiling import compile_model

    spec = model_spec(config=save_config(tmp_path, family), vocab_size=256, eos_id=EOS, max_positions=64)
    x = torch.randint(1, 256, (2, 32), generator=torch.Generator().manual_seed(0))

    def loss_and_grads(net, model):
        loss = lm_loss(net, x)
        loss.backward()
        return loss.item(), {n: p.grad for n, p in model.named_parameters()}

    plain = build_from_spec(spec, seed=1).train()
    want, grads = loss_and_grads(plain, plain)
    for ckpt in (True, False):
        model = build_from_spec(spec, seed=1, activation_checkpointing=ckpt).train()
        counter = CompileCounter()
        net = model if ckpt else compile_model(model, model, graphs=2, backend=counter)
        got, got_grads = loss_and_grads(net, model)
        assert got == pytest.approx(want, abs=1e-5)
        assert all(torch.allclose(got_grads[n], g, atol=1e-5) for n, g in grads.items())
        assert ckpt or counter.frame_count == 1


def test_model_folders_gl_ray_cannot_train_are_one_line(tmp_path):
    def refused(match, **kw):
        with pytest.raises(UserError, match=match) as e:
            model_spec(vocab_size=1000, eos_id=0, max_positions=256, final_len=256, **kw)
        assert "\n" not in str(e.value)

    refused("is not a folder, nor a model in the local Hugging Face cache", config=str(tmp_path / "missing"))
    refused("nor a model in the local Hugging Face cache", init_from="acme/not-cached")
    (tmp_path / "empty").mkdir()
    refused("has no config.json", config=str(tmp_path / "empty"))
    refused("model without RoPE of type 'gpt2'", config=save_config(tmp_path / "gpt2", "gpt2"))
    refused("vocab_size 512, fewer than the dataset's 1000", config=save_config(tmp_path / "v", "llama",
                                                                                 vocab_size=512))
    refused("sliding window of 128 tokens, shorter than the final length 256",
            config=save_config(tmp_path / "m", "mistral", sliding_window=128))
    refused("both given", config=save_config(tmp_path / "l", "llama"), init_from=str(tmp_path / "l"))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    refused("cannot be read", config=str(tmp_path / "bad"))


def test_a_hub_name_is_read_from_the_local_cache_only(tmp_path, monkeypatch):
    """org/model names resolve to their snapshot in the local HF cache (HF_HUB_CACHE), never a download."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))  # HF_HUB_CACHE, as read at import
    repo = tmp_path / "models--acme--tiny-llama"
    save_config(repo / "snapshots" / "abc123", "llama")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    spec = model_spec(config="acme/tiny-llama", vocab_size=1000, eos_id=0, max_positions=64)
    assert spec.family == "llama" and spec.source == "config acme/tiny-llama"


def test_spec_round_trips_through_json(tmp_path):
    spec = model_spec(config=save_config(tmp_path, "qwen3"), vocab_size=1000, eos_id=0, max_positions=256)
    back = ModelSpec.from_json(json.loads(json.dumps(spec.to_json())))
    assert back == spec and back.shape == spec.shape and back.hf_config("sdpa").model_type == "qwen3"
    assert spec.config["max_position_embeddings"] == 256  # raised to the run's length (default rope: a record)


# ---- runs: a Llama and a Qwen config folder train two stages, resume exactly and export ----

def family_run(tiny_data, storage, name, folder, **extra):
    return run_tiny(tiny_data, storage, name, **{"model.config": folder} | extra)


@pytest.fixture(scope="module")
def family_runs(tiny_data, tmp_path_factory):
    """Uninterrupted no-Ray runs of a tiny Llama (with a RoPE base per stage) and a tiny Qwen3 config."""
    root = tmp_path_factory.mktemp("families")
    out = {}
    for family, extra in (("llama", {"schedule.rope_theta": "[10000,40000]"}), ("qwen3", {})):
        folder = save_config(root / f"{family}-config", family)
        family_run(tiny_data, root, family, folder, **extra)
        out[family] = (folder, root / family, extra)
    return out


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_a_config_folder_trains_resumes_exactly_and_exports(family, family_runs, tiny_data, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    folder, base, extra = family_runs[family]
    monkeypatch.setenv("GL_RAY_FAIL_AT_STEP", "10")  # into stage 2: the resume applies its RoPE base again
    with pytest.raises(InjectedFault):
        family_run(tiny_data, tmp_path, "cut", folder, **extra)
    monkeypatch.delenv("GL_RAY_FAIL_AT_STEP")
    family_run(tiny_data, tmp_path, "cut", folder, **extra)
    got, want = metrics(tmp_path / "cut"), metrics(base)
    assert [m["step"] for m in got] == [m["step"] for m in want] and want[-1]["loss"] < want[0]["loss"]
    for a, b in zip(got, want):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6), a["step"]
    wa, wb = weights(tmp_path / "cut"), weights(base)
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)
    final = AutoModelForCausalLM.from_pretrained(base / "final")  # stock class, stock loader
    assert type(final).__name__ == {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}[family]
    exported = json.loads((base / "final" / "config.json").read_text())
    assert exported["rope_parameters"]["rope_theta"] == (40000 if extra else 10000)  # the last stage's base
    stages = json.loads((base / "plan.json").read_text())["stages"]
    assert [s.get("rope_theta") for s in stages] == ([10000.0, 40000.0] if extra else [None, None])
    assert json.loads((base / "model.json").read_text())["source"] == f"config {folder}"
    assert json.loads((base / "plan.json").read_text())["model"]["family"] == family
    assert metrics(base)[-1]["flops"] == pytest.approx(training_flops(
        model_spec(config=folder, vocab_size=1024, eos_id=0, max_positions=128).shape, 16384, 8192 * (32 + 64)))


def test_a_config_folder_trains_on_ray_as_without(family_runs, tiny_data, tmp_path):
    """The same Qwen3 run on one Ray Train worker: the same losses and final weights as in one process."""
    folder, base, _ = family_runs["qwen3"]
    family_run(tiny_data, tmp_path, "ray", folder, **{"ray.num_workers": 1})
    got, want = metrics(tmp_path / "ray"), metrics(base)
    assert [m["loss"] for m in got] == pytest.approx([m["loss"] for m in want], abs=1e-5)
    wa, wb = weights(tmp_path / "ray"), weights(base)
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)


def test_auto_micro_batch_sizes_a_familys_model(family_runs, tiny_data, tmp_path, monkeypatch):
    """micro_batch_tokens auto on a Qwen3 folder: tries above 5 sequences run out of memory, each stage goes on with
    4, and the losses are the fixed micro batch's; a memory budget below the model's own parameters (its shape, not
    a preset's) is refused before the run."""
    folder, base, _ = family_runs["qwen3"]
    monkeypatch.setenv("GL_RAY_OOM_ABOVE_SEQS", "5")
    family_run(tiny_data, tmp_path, "auto", folder, **{"train.micro_batch_tokens": "auto"})
    got, want = metrics(tmp_path / "auto"), metrics(base)
    assert {m["micro_batch"] for m in got} == {4}
    assert [m["loss"] for m in got] == pytest.approx([m["loss"] for m in want], abs=1e-5)
    with pytest.raises(UserError, match="train.memory_budget .* does not fit"):
        family_run(tiny_data, tmp_path, "small", folder,
                   **{"train.micro_batch_tokens": "auto", "train.memory_budget": "1MiB"})
    assert not (tmp_path / "small").exists()


def test_resuming_with_another_architecture_is_refused(family_runs, tiny_data, tmp_path):
    """Another config folder is refused by the fingerprint; the same folder edited to another shape by the model
    record (RUN/model.json), each before anything is written."""
    folder, base, _ = family_runs["qwen3"]
    shutil.copytree(base, tmp_path / "qwen3")
    with pytest.raises(UserError, match="was started with model.config="):
        family_run(tiny_data, tmp_path, "qwen3", save_config(tmp_path / "other", "qwen3"))
    original = (Path(folder) / "config.json").read_text()
    try:
        save_config(Path(folder), "qwen3", intermediate_size=256)
        with pytest.raises(UserError, match="differs in intermediate_size"):
            family_run(tiny_data, tmp_path, "qwen3", folder)
    finally:
        (Path(folder) / "config.json").write_text(original)
    assert len(metrics(tmp_path / "qwen3")) == len(metrics(base))


# ---- continued pretraining: model.init_from ----

def test_init_from_starts_from_the_folders_weights(baseline, tiny_data, tmp_path):
    """Step 0 of an init_from model gives the source model's logits (as the stock loader reads it)."""
    from transformers import AutoModelForCausalLM

    _, _, run = baseline
    spec = model_spec(init_from=str(run / "final"), vocab_size=1000, eos_id=0, max_positions=256)
    assert spec.trained_len == 128 and spec.family == "gpt_neox"
    assert model_line(spec, 128).endswith("made for 128 tokens, stages from 128")
    assert "(shorter: GrowLength usually continues" in model_line(spec, 64)
    ours, stock = build_from_spec(spec).eval(), AutoModelForCausalLM.from_pretrained(run / "final").eval()
    x = torch.randint(1, 1000, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(ours(input_ids=x).logits, stock(input_ids=x).logits, atol=1e-5)


def test_continued_pretraining_resumes_without_its_source(baseline, tiny_data, tmp_path, monkeypatch):
    """A run from init_from's weights trains on from them (lower first loss than a fresh init), and once it has a
    checkpoint it resumes exactly even when the source folder is gone (the checkpoint wins)."""
    _, _, run = baseline
    source = tmp_path / "source"
    shutil.copytree(run / "final", source)
    grow = {"model.init_from": str(source), "schedule.lengths": "[64,128]", "model.max_position_embeddings": 256}
    run_tiny(tiny_data, tmp_path, "ref", **grow)
    monkeypatch.setenv("GL_RAY_FAIL_AT_STEP", "6")
    with pytest.raises(InjectedFault):
        run_tiny(tiny_data, tmp_path, "cut", **grow)
    monkeypatch.delenv("GL_RAY_FAIL_AT_STEP")
    shutil.rmtree(source)
    run_tiny(tiny_data, tmp_path, "cut", **grow)
    got, want = metrics(tmp_path / "cut"), metrics(tmp_path / "ref")
    assert [m["loss"] for m in got] == pytest.approx([m["loss"] for m in want], abs=1e-6)
    fresh_first = metrics(run)[0]["loss"]
    assert want[0]["loss"] < fresh_first - 0.5  # it starts from the trained weights
    assert json.loads((tmp_path / "ref" / "model.json").read_text())["init_from"] == str(source)


def train_cli(capsys, monkeypatch, tiny_data, tmp_path, **extra):
    """`gl-ray train` of a tiny run named x (in this process)."""
    sets = [a for kv in tiny_overrides(tiny_data, str(tmp_path), "x", **extra) for a in ("--set", kv)]
    return cli_inprocess(capsys, monkeypatch, "train", *sets)


def test_init_from_with_another_tokenizer_is_one_line_exit_2(baseline, tiny_data, tmp_path, capsys, monkeypatch):
    _, _, run = baseline
    other = tmp_path / "other"
    shutil.copytree(run / "final", other)
    shutil.copy(NEOX_TOKENIZER / "tokenizer.json", other / "tokenizer.json")
    r = train_cli(capsys, monkeypatch, tiny_data, tmp_path, **{"model.init_from": str(other)})
    assert r.returncode == 2 and "has a tokenizer of 50277 tokens, the dataset's has" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "x").exists()
    (other / "tokenizer.json").unlink()
    r = train_cli(capsys, monkeypatch, tiny_data, tmp_path, **{"model.init_from": str(other)})
    assert r.returncode == 2 and "has no tokenizer.json" in r.stderr


def test_a_model_without_rope_is_one_line_exit_2(tiny_data, tmp_path, capsys, monkeypatch):
    r = train_cli(capsys, monkeypatch, tiny_data, tmp_path, **{"model.config": save_config(tmp_path / "gpt2", "gpt2")})
    assert r.returncode == 2 and "without RoPE" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()
