import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import cli_inprocess

from gl_ray.config import apply_overrides, config_from_dict, describe_keys, load_config
from gl_ray.errors import UserError
from gl_ray.schedule import make_plan
from gl_ray.train.preflight import preflight

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "pipelines" / "configs").glob("*.yaml"))


def test_there_are_shipped_configs():
    names = {p.stem for p in CONFIGS}
    for size in ("70m", "160m", "410m"):
        assert {f"pythia-{size}-growlength", f"pythia-{size}-fixed128", f"pythia-{size}-fixed1024"} <= names
    assert "tiny-growlength" in names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_shipped_config_loads_and_plans(path):
    cfg = load_config(path)
    plan = make_plan(cfg)
    if cfg.schedule.budget_time_s and cfg.schedule.budget_tokens:  # a time budget under a token cap: whole steps
        slack = cfg.schedule.tokens_per_step * len(plan.stages)
        assert cfg.schedule.budget_tokens - slack < plan.total_tokens <= cfg.schedule.budget_tokens
    else:
        assert plan.total_tokens == cfg.schedule.budget_tokens
    assert plan.final_len == cfg.schedule.lengths[-1] <= cfg.model.max_position_embeddings
    assert cfg.name == path.stem


def test_overrides_are_parsed_as_yaml():
    raw = apply_overrides({}, ["schedule.lengths=[64,128]", "schedule.ratios=[0.5, 0.5]", "optim.lr=1e-3",
                               "ray.use_gpu=true", "name=abc"])
    cfg = config_from_dict(raw)
    assert cfg.schedule.lengths == [64, 128] and cfg.optim.lr == 1e-3 and cfg.ray.use_gpu is True
    assert cfg.name == "abc"


@pytest.mark.parametrize("overrides, needle", [
    (["schedule.lenghts=[64]"], "did you mean 'schedule.lengths'"),
    (["optim.lr=fast"], "expects float"),
    (["schedule.lengths=64"], "expects list"),
    (["model.max_position_embeddings=256"], "exceeds model.max_position_embeddings"),
    (["model.position_mode=rope"], "extrapolate | interpolate | pose"),
    (["model.preset=gpt5"], "is not one of tiny | pythia-14m"),
    (["train.micro_batch_tokens=0"], "must be positive"),
    (["train.micro_batch_tokens=most"], "expects int or 'auto'"),
    (["train.micro_batch_tokens=auto", "train.memory_budget=plenty"], "train.memory_budget 'plenty'"),
    (["ray.strategy=zero3"], "ddp | fsdp"),
    (["data.seed=-1"], "data.seed must be >= 0"),
    (["optim.beta1=1.5"], r"optim.beta1 must be in \[0, 1\)"),
    (["optim.eps=-1"], "optim.eps must be positive"),
    (["model.init_std=-1"], "model.init_std must be positive"),
    (["model.rope_theta=0"], "model.rope_theta must be positive"),
    (["train.device=cuda", "ray.num_workers=1"], "needs ray.use_gpu=true"),
    (["ray.strategy=fsdp", "ray.num_workers=0"], "set ray.num_workers >= 1"),
    (["optim.min_lr=1"], "above optim.lr"),
    (["schedule.lengths"], "section.key=value"),
])
def test_bad_values_are_one_line_user_errors(overrides, needle):
    with pytest.raises(UserError, match=needle) as e:
        preflight(load_config(CONFIGS[0], overrides))
    assert "\n" not in str(e.value)


def test_unknown_yaml_key_in_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("name: x\noptim:\n  weight_decy: 1\n")
    with pytest.raises(UserError, match="unknown config key 'optim.weight_decy'; did you mean 'optim.weight_decay'"):
        load_config(p)
    p.write_text("name: x\nsched:\n  lengths: [64]\n")
    with pytest.raises(UserError, match="did you mean 'schedule"):
        load_config(p)
    p.write_text("name: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(p)
    with pytest.raises(UserError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_every_field_is_documented():
    text = describe_keys()
    for key in ("schedule.lengths", "schedule.budget_time_s", "train.micro_batch_tokens", "ray.num_workers",
                "model.position_mode", "data.path", "optim.warmup_tokens"):
        assert key in text
    assert all(": " in line and line.split(": ", 1)[1].strip() for line in text.splitlines())


def run_cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "gl_ray", *args], capture_output=True, text=True, **kw)


def test_cli_plan_json_and_help():
    r = run_cli("plan", "--config", str(CONFIGS[0]), "--json")
    assert r.returncode == 0, r.stderr
    import json

    j = json.loads(r.stdout)
    assert j["total_tokens"] == sum(s["tokens"] for s in j["stages"])
    assert j["model"]["family"] == "gpt_neox" and j["model"]["params"] > 0
    h = run_cli("plan", "--help")
    assert "schedule.tokens_per_step" in h.stdout and "ray.num_workers" in h.stdout


def test_version_is_the_packages_one():
    import importlib.metadata
    import re

    from gl_ray import __version__

    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert __version__ == re.search(r'^version = "(.+)"$', pyproject, re.M)[1] == importlib.metadata.version("gl-ray")
    r = run_cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"gl-ray {__version__}"


def test_cli_bad_config_exits_2_with_one_line():
    r = run_cli("plan", "--config", str(CONFIGS[0]), "--set", "schedule.ratios=[0.3,0.3]")
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert "schedule.ratios" in r.stderr


def test_config_choices_match_the_code_that_uses_them():
    """The config's Literal types are the one list of choices; the model's runtime checks agree with them."""
    from typing import get_args

    from gl_ray.config import Attention, PositionMode, Preset
    from gl_ray.attention import ATTENTION
    from gl_ray.model import POSITION_MODES, PRESETS

    assert get_args(PositionMode) == POSITION_MODES
    assert get_args(Attention) == tuple(ATTENTION)
    assert get_args(Preset) == tuple(PRESETS)


def test_cuda_without_a_gpu_is_refused_up_front(monkeypatch):
    """On any machine: where torch finds no CUDA device, train.device=cuda without Ray is refused before the run;
    where it finds one, the same config passes."""
    import torch

    sets = ["train.device=cuda", "ray.num_workers=0"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="no CUDA device is available here"):
        preflight(load_config(CONFIGS[0], sets))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    preflight(load_config(CONFIGS[0], sets))


@pytest.mark.parametrize("text, needle", [
    ("- a\n- b\n", "must be a YAML mapping"),
    ("data: 5\n", "section 'data' must be a mapping"),
], ids=["yaml-list", "scalar-section"])
def test_malformed_config_files_with_overrides(tmp_path, text, needle):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=needle):
        load_config(path, ["data.path=x"])


def test_non_utf8_config_file(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(UserError, match="not UTF-8"):
        load_config(path)


def test_a_huge_micro_batch_validates_quickly():
    """Finding the micro batch enumerates divisors in O(sqrt n): 2**40 tokens per step validated for minutes."""
    from gl_ray.schedule import micro_batch_for

    cfg = load_config(CONFIGS[0], ["schedule.tokens_per_step=1099511627776", "train.micro_batch_tokens=1099511627776",
                                   f"schedule.budget_tokens={2**42}"])
    assert cfg.schedule.tokens_per_step == 2**40
    assert micro_batch_for(2**34, 64, 2**40) == 2**34 and micro_batch_for(12, 8, 40) == 4


def _plan(*sets):
    from gl_ray.schedule import make_plan

    return make_plan(load_config(None, ["schedule.budget_tokens=10000000", "model.max_position_embeddings=1024",
                                        *sets]))


def test_linear_and_geometric_shapes_generate_stages():
    lin = _plan("schedule.shape=linear", "schedule.start_len=128", "schedule.final_len=1024", "schedule.len_step=128",
                "schedule.tokens_per_step=107520", "schedule.warmup_fraction=0.3")
    assert [s.seq_len for s in lin.stages] == list(range(128, 1025, 128))
    warm = sum(s.steps for s in lin.stages[:-1])
    assert abs(warm / lin.total_steps - 0.3) < 0.01 and len({s.steps for s in lin.stages[:-1]}) <= 2
    geo = _plan("schedule.shape=geometric", "schedule.growth=2", "schedule.len_step=64")  # a ladder's ends
    assert _plan("schedule.len_step=64", "schedule.growth=8").stages == _plan().stages  # ladder: keys ignored
    assert [s.seq_len for s in geo.stages] == [128, 256, 512, 1024]
    by_count = _plan("schedule.shape=geometric", "schedule.start_len=128", "schedule.final_len=1024",
                     "schedule.num_stages=3")
    assert [s.seq_len for s in by_count.stages] == [128, 256, 512, 1024]
    n = _plan("schedule.shape=linear", "schedule.start_len=256", "schedule.final_len=1024",
              "schedule.num_stages=3", "schedule.tokens_per_step=3072")
    assert [s.seq_len for s in n.stages] == [256, 512, 768, 1024]


def test_window_mode_keeps_rows_at_the_final_length():
    p = _plan("schedule.mode=window", "schedule.lengths=[128,256,1024]")
    assert [(s.seq_len, s.window) for s in p.stages] == [(1024, 128), (1024, 256), (1024, 0)]
    assert p.to_json()["stages"][0]["window"] == 128
    from gl_ray.schedule import format_plan

    assert "window" in format_plan(p).splitlines()[0]


@pytest.mark.parametrize("sets, needle", [
    (["schedule.shape=linear", "schedule.start_len=128", "schedule.final_len=1000", "schedule.len_step=128"],
     "final_len 1000 is not reachable from start_len 128 in steps of len_step=128"),
    (["schedule.shape=linear", "schedule.start_len=128", "schedule.final_len=1024", "schedule.len_step=128"],
     "tokens_per_step=65536 is not divisible by seq_len 384; .* multiple of 107520"),
    (["schedule.shape=geometric", "schedule.start_len=128", "schedule.final_len=1000", "schedule.growth=2"],
     "multiples of 8|not reachable"),
    (["schedule.shape=geometric", "schedule.start_len=128", "schedule.final_len=1024", "schedule.growth=3"],
     "final_len 1024 is not reachable from start_len 128 by factors of growth=3"),
    (["schedule.shape=linear", "schedule.start_len=128", "schedule.final_len=1024"], "exactly one of"),
    (["schedule.shape=linear", "schedule.start_len=1024", "schedule.len_step=8"], "start_len < final_len"),
    (["schedule.mode=window", "model.position_mode=pose"], "does not compose"),
    (["schedule.mode=window", "model.attention=flash_attention_2"], "flash_attention_2|needs model.attention"),
    (["schedule.warmup_fraction=1.5"], r"warmup_fraction=1.5 must be in \(0, 1\)"),
    (["schedule.warmup_fraction=0.5", "schedule.ratios=[0.25,0.25,0.25,0.25]"], "not both"),
    (["schedule.shape=cosine"], "schedule.shape"),
])
def test_bad_schedules_are_one_line(sets, needle, capsys, monkeypatch):
    r = cli_inprocess(capsys, monkeypatch, "plan", "--set", "schedule.budget_tokens=10000000",
                      "--set", "model.max_position_embeddings=1024", *[a for s in sets for a in ("--set", s)])
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert re.search(needle, r.stderr), r.stderr


@pytest.mark.parametrize("text, needle", [
    ("name: x\nschedule:\n  lengths: [64]\nschedule:\n  ratios: [1.0]\n", "line 4: key 'schedule' is given twice"),
    ("optim:\n  lr: 1.0e-3\n  lr: 2.0e-3\n", "line 3: key 'lr' is given twice"),
    ("a: &a [1, 1, 1, 1, 1, 1, 1, 1]\nb: [*a, *a, *a, *a, *a, *a, *a, *a]\n", "aliases"),
    ("x: " + "[" * 3000 + "]" * 3000 + "\n", "nested deeper than 32"),
], ids=["duplicate-section", "duplicate-key", "alias-bomb", "deep-nesting"])
def test_yaml_that_would_be_misread_or_blow_up_is_one_line(tmp_path, text, needle):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(UserError, match=needle) as e:
        load_config(p)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("sets, needle", [
    (["schedule.lengths=[]"], "schedule.lengths is empty"),
    (["train.micro_batch_tokens=auto", "train.memory_budget=inf"], "train.memory_budget 'inf'"),
    (["schedule.shape=linear", "schedule.num_stages=300000000"], "300,000,000 stages, more than 1024"),
    (["schedule.shape=geometric", "schedule.growth=1.000000001"], "more than 1024"),
    (["ray.cpus_per_worker=-1"], "ray.cpus_per_worker must be positive"),
    (["ray.local_num_cpus=-1"], "ray.local_num_cpus must be >= 0"),
    (["data.prefetch_batches=-1"], "data.prefetch_batches must be >= 0"),
    (["schedule.budget_tokens=1e300"], "beyond any corpus"),
    (['name="a\\x00b"'], "no control characters"),
])
def test_inputs_that_used_to_crash_or_hang_are_one_line(sets, needle):
    ladder = next(p for p in CONFIGS if p.stem == "tiny-growlength")
    with pytest.raises(UserError, match=needle) as e:
        preflight(load_config(ladder, sets))
    assert "\n" not in str(e.value)


def test_integers_in_any_yaml_float_spelling():
    for text in ("1.5e4", "1.5e+4", "15000.0"):
        assert load_config(CONFIGS[0], [f"schedule.budget_tokens={text}"]).schedule.budget_tokens == 15000
    with pytest.raises(UserError, match="expects int"):
        load_config(CONFIGS[0], ["schedule.budget_tokens=1.5"])
