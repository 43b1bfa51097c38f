"""The lowest torch and transformers (gl_ray/versions.py): pyproject says the same, an older one is one line and
exit 2 at import, and `make test-lowest` runs the core tests on exactly those versions."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from gl_ray.versions import LOWEST, installed_versions, release, too_old

REPO = Path(__file__).resolve().parents[1]


def test_pyproject_states_the_lowest_versions():
    deps = re.search(r"^dependencies = \[(.*?)^\]", (REPO / "pyproject.toml").read_text(), re.M | re.S)[1]
    for name, low in LOWEST.items():
        assert re.search(rf'"{name}>={re.escape(low)}"', deps), f"pyproject's {name} bound is not >={low}"
    makefile = (REPO / "Makefile").read_text()
    for name, low in LOWEST.items():
        assert f"{name}=={low}.0" in makefile  # make test-lowest installs exactly the bounds


def test_versions_compare_by_release():
    assert release("2.13.0+cpu") == (2, 13, 0) and release("5.0.0rc1") == (5, 0, 0) and release("5.0") == (5, 0, 0)
    assert too_old({"torch": "2.5.1+cu124", "transformers": "5.0.0"}) == ["torch>=2.6 (found 2.5.1+cu124)"]
    assert too_old({"torch": "2.13.0", "transformers": "4.57.6"}) == ["transformers>=5.0 (found 4.57.6)"]
    assert too_old({"torch": "2.6.0", "transformers": None}) == []  # not installed: its import says so


def test_an_old_torch_is_one_line_and_exit_2_at_import(tmp_path):
    """A torch 2.4.1 found first on the path (its metadata only): `import gl_ray` and the CLI stop with one line."""
    meta = tmp_path / "torch-2.4.1.dist-info"
    meta.mkdir()
    (meta / "METADATA").write_text("Metadata-Version: 2.1\nName: torch\nVersion: 2.4.1\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    for args in (["-c", "import gl_ray"], ["-m", "gl_ray", "--version"]):
        r = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True)
        assert r.returncode == 2 and "Traceback" not in r.stderr
        assert r.stderr.strip() == "error: gl-ray needs torch>=2.6 (found 2.4.1): upgrade with pip install 'torch>=2.6'"


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("GL_RAY_LOWEST_BOUNDS"),
                    reason="runs under `make test-lowest` (GL_RAY_LOWEST_BOUNDS=1 in .venv-lowest)")
def test_this_interpreter_has_exactly_the_lowest_versions():
    """Asked for by `make test-lowest`: the core tests beside this one ran on the lowest bounds, not newer ones."""
    found = installed_versions()
    assert {name: release(found[name]) for name in LOWEST} == {name: release(low) for name, low in LOWEST.items()}
