"""Datasets and runs in S3, against a local moto S3 server."""

import json
from pathlib import Path

import boto3
import pytest
from conftest import tiny_overrides

from gl_ray import storage
from gl_ray.config import load_config
from gl_ray.data.prepare import prepare
from gl_ray.data.stream import TokenStream
from gl_ray.errors import UserError
from gl_ray.train.driver import launch_run
from gl_ray.train.faults import InjectedFault


def keys(endpoint, bucket, prefix=""):
    s3 = boto3.client("s3", endpoint_url=endpoint)
    return sorted(o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", []))


def test_prepare_from_and_to_s3(ray_local, s3_server, bucket, tmp_path, tiny_data):
    s3 = boto3.client("s3", endpoint_url=s3_server)
    src = Path(__file__).resolve().parents[1] / "gl_ray"
    for p in sorted(src.rglob("*.py"))[:12]:
        s3.put_object(Bucket=bucket, Key=f"corpus/{p.relative_to(src)}", Body=p.read_bytes())
    m = prepare(f"s3://{bucket}/corpus", f"s3://{bucket}/ds", tokenizer=str(Path(tiny_data) / "tokenizer"),
                val_fraction=0.25)
    got = keys(s3_server, bucket, "ds/")
    assert "ds/manifest.json" in got and "ds/tokenizer/tokenizer.json" in got
    assert not [k for k in got if "_units" in k]  # the per-unit work files are gone once the manifest is there
    assert all(f"ds/{sh['path']}" in got for sh in m["splits"]["train"]["shards"])
    assert m["splits"]["train"]["documents"] + m["splits"]["val"]["documents"] + m["skipped_empty"] == 12
    stream = TokenStream(f"s3://{bucket}/ds", "train")
    assert stream.tokens == m["splits"]["train"]["tokens"] and len(stream.read(0, 100)) == 100
    # the same corpus prepared locally gives the same shards
    local = prepare(f"s3://{bucket}/corpus", str(tmp_path / "local"), tokenizer=str(Path(tiny_data) / "tokenizer"),
                    val_fraction=0.25)
    assert local["splits"] == m["splits"]


def test_train_with_data_and_runs_in_s3_and_resume_from_the_bucket(ray_local, s3_server, bucket, tiny_data,
                                                                      monkeypatch):
    # dataset copied into the bucket
    for p in Path(tiny_data).rglob("*"):
        if p.is_file():
            storage.write_bytes(f"s3://{bucket}/data/{p.relative_to(tiny_data)}", p.read_bytes())
    sets = tiny_overrides(f"s3://{bucket}/data", f"s3://{bucket}/runs", "s3run")
    monkeypatch.setenv("GL_RAY_FAIL_AT_STEP", "6")
    with pytest.raises(InjectedFault):
        launch_run(load_config(None, sets), quiet=True)
    monkeypatch.delenv("GL_RAY_FAIL_AT_STEP")
    summary = launch_run(load_config(None, sets), quiet=True)
    got = keys(s3_server, bucket, "runs/s3run/")
    for name in ("config.yaml", "plan.json", "metrics.jsonl", "summary.json", "final/model.safetensors",
                 "final/config.json", "final/tokenizer.json", "checkpoint_step-0000016/state.json"):
        assert f"runs/s3run/{name}" in got
    lines = storage.read_bytes(f"s3://{bucket}/runs/s3run/metrics.jsonl").decode().splitlines()
    assert [json.loads(x)["step"] for x in lines] == list(range(1, 17))  # resumed: each step once
    assert summary["steps"] == 16


def test_missing_bucket_is_one_clear_line(s3_server, tiny_data):
    with pytest.raises(UserError, match="bucket .* does not exist"):
        launch_run(load_config(None, tiny_overrides(tiny_data, "s3://no-such-bucket-x/runs", "x")), quiet=True)
    with pytest.raises(UserError, match="does not exist|no dataset"):
        TokenStream("s3://no-such-bucket-x/ds", "train")


def test_an_s3_prefix_without_documents_is_one_line(s3_server, bucket, tmp_path):
    storage.write_bytes(f"s3://{bucket}/only-binaries/x.bin", b"\x00")
    with pytest.raises(UserError, match=f"source 's3://{bucket}/only-binaries' has no document files"):
        prepare(f"s3://{bucket}/only-binaries", str(tmp_path / "o"))
    assert not list(tmp_path.glob("o*"))
