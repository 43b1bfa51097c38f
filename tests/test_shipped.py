"""Shipped configs and Tune spaces found by name (gl_ray/shipped.py), and the wheel standing alone: built from this
checkout, installed into a fresh venv outside the repo, it plans and trains by config name."""

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from gl_ray.config import load_config
from gl_ray.errors import UserError
from gl_ray.shipped import find_shipped, shipped_names

from conftest import tiny_overrides

REPO = Path(__file__).resolve().parents[1]


def test_configs_and_spaces_are_found_by_name_or_path(tmp_path, monkeypatch):
    assert set(shipped_names("configs")) == {p.stem for p in (REPO / "pipelines" / "configs").glob("*.yaml")}
    assert "ladders" in shipped_names("tune_spaces")
    monkeypatch.chdir(tmp_path)  # outside the repo: the old repo-relative spelling still finds the shipped file
    for given in ("pythia-160m-growlength", "pythia-160m-growlength.yaml",
                  "pipelines/configs/pythia-160m-growlength.yaml"):
        assert find_shipped(given, "configs").resolve() == REPO / "pipelines/configs/pythia-160m-growlength.yaml"
    assert load_config("pythia-160m-growlength").model.preset == "pythia-160m"
    mine = tmp_path / "pythia-160m-growlength.yaml"  # a file of that name here wins over the shipped one
    mine.write_text("name: mine\n")
    assert find_shipped("pythia-160m-growlength.yaml", "configs") == Path("pythia-160m-growlength.yaml")
    with pytest.raises(UserError, match=r"config file 'no-such' not found: .*pythia-160m-growlength"):
        find_shipped("no-such", "configs")
    with pytest.raises(UserError, match="search space 'nope' not found"):
        find_shipped("nope", "tune_spaces")


def _wheel(out: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(out)], check=True, capture_output=True, text=True)
    return next(out.glob("gl_ray-*.whl"))


def _fresh_venv(where: Path) -> Path:
    """A new venv whose only gl-ray is the wheel's; its other packages come from this one's site-packages (a
    .pth line adds the folder to sys.path without running this venv's .pth files, so the editable checkout is
    not importable there)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(where)], check=True)
    python = where / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


@pytest.mark.slow
def test_the_wheel_installs_and_runs_outside_the_repo(tiny_data, tmp_path):
    wheel = _wheel(tmp_path / "dist")
    names = zipfile.ZipFile(wheel).namelist()
    assert not any(n.startswith("pipelines/") for n in names)  # no generic top-level package
    assert "gl_ray/configs/pythia-160m-growlength.yaml" in names and "gl_ray/tune_spaces/ladders.yaml" in names
    assert {n.split("/")[0] for n in names if not n.startswith("gl_ray-")} == {"gl_ray"}
    python = _fresh_venv(tmp_path / "venv")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)],
                   check=True, capture_output=True, text=True)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    gl_ray = [str(python.parent / "gl-ray")]
    where = subprocess.run([python, "-c", "import gl_ray; print(gl_ray.__file__)"], cwd=work, env=env,
                           capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(tmp_path / "venv"))
    plan = subprocess.run([*gl_ray, "plan", "--config", "pythia-160m-growlength"], cwd=work, env=env,
                          capture_output=True, text=True)
    assert plan.returncode == 0, plan.stderr
    assert "pythia-160m" in plan.stdout and "1024" in plan.stdout
    sets = tiny_overrides(tiny_data, str(work / "runs"), "from-wheel")
    train = subprocess.run([*gl_ray, "train", "--config", "tiny-growlength", "--no-ray",
                            *[a for s in sets for a in ("--set", s)]], cwd=work, env=env, capture_output=True,
                           text=True, timeout=300)
    assert train.returncode == 0, train.stderr[-2000:]
    assert (work / "runs" / "from-wheel" / "final" / "config.json").is_file()
    assert (work / "runs" / "from-wheel" / "summary.json").is_file()
