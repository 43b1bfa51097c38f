"""What gl-ray prints: `--verbose` reaches the library from `gl-ray train`, `gl-ray prepare` and the demo.

The quiet default (gl-ray's progress lines plain, Ray's INFO lines off) is checked on a real two-worker run by
test_ray_train's SIGTERM test, which already captures a `gl-ray train` console."""

import pytest
from conftest import REPO

import pipelines.demo
from gl_ray.cli import main


@pytest.mark.parametrize("flag", [[], ["--verbose"]])
def test_verbose_reaches_train_and_prepare(monkeypatch, tmp_path, flag):
    import gl_ray.data.prepare
    import gl_ray.train.driver

    seen = {}

    def fake_prepare(source, out, **kw):
        seen["prepare"] = kw["verbose"]
        split = {"documents": 1, "tokens": 8, "shards": []}
        return {"vocab_size": 8, "splits": {"train": split, "val": split}}

    monkeypatch.setattr(gl_ray.data.prepare, "prepare", fake_prepare)
    monkeypatch.setattr(gl_ray.train.driver, "launch_run", lambda cfg, **kw: seen.update(train=kw["verbose"]))
    assert main(["prepare", "--out", str(tmp_path / "ds"), *flag]) == 0
    assert main(["train", "--config", str(REPO / "pipelines/configs/tiny-growlength.yaml"), *flag]) == 0
    assert seen == {"prepare": bool(flag), "train": bool(flag)}


def test_the_demo_passes_verbose_on(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(pipelines.demo, "main", lambda argv: calls.append(argv) or 0)
    monkeypatch.chdir(tmp_path)  # no data/stdlib here: the demo prepares it first
    assert pipelines.demo.demo(["--verbose", "--max-docs", "3"]) == 0
    assert [c[0] for c in calls] == ["prepare", "train"] and all("--verbose" in c for c in calls)
