"""cluster/: the launcher config validates against the schema Ray ships, the KubeRay manifest is complete, and
every file and entrypoint they name exists."""

import importlib.util
import json
import re
from pathlib import Path

import jsonschema
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
RAY_DIR = Path(importlib.util.find_spec("ray").origin).parent  # not imported: see gl_ray.ray_utils.ensure_ray


def ray_version() -> str:
    from importlib.metadata import version

    return version("ray")


def test_aws_config_validates_against_rays_autoscaler_schema():
    schema = json.loads((RAY_DIR / "autoscaler" / "ray-schema.json").read_text())
    cfg = yaml.safe_load((CLUSTER / "aws-gpu.yaml").read_text())
    jsonschema.validate(cfg, schema)
    assert cfg["head_node_type"] in cfg["available_node_types"]
    starts = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in starts  # the dashboard/job port is not opened to the internet
    assert any("torch" in c and "cu" in c for c in cfg["setup_commands"])  # a CUDA torch on GPU nodes


def test_kuberay_rayjob_has_the_required_fields():
    job = yaml.safe_load((CLUSTER / "kuberay-rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob" and job["metadata"]["name"]
    spec = job["spec"]
    assert spec["entrypoint"].startswith("python -m pipelines.pretrain --config ")
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == ray_version()
    assert cluster["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "127.0.0.1"
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        pod = group["template"]["spec"]
        assert any(v.get("emptyDir", {}).get("medium") == "Memory" for v in pod["volumes"])  # /dev/shm
        assert all(any(m["mountPath"] == "/dev/shm" for m in c["volumeMounts"]) for c in pod["containers"])
    gpus = [c["resources"]["limits"].get("nvidia.com/gpu") for g in cluster["workerGroupSpecs"]
            for c in g["template"]["spec"]["containers"]]
    assert all(gpus)


def test_every_named_config_and_entrypoint_exists():
    text = "\n".join(p.read_text() for p in CLUSTER.iterdir() if p.is_file())
    for cfg in set(re.findall(r"pipelines/configs/[\w.-]+\.yaml", text)):
        assert (REPO / cfg).is_file(), cfg
    for mod in set(re.findall(r"python -m ([\w.]+)", text)):
        assert importlib.util.find_spec(mod) is not None, mod


def test_no_credentials_in_cluster_files():
    for p in CLUSTER.glob("*.yaml"):
        text = p.read_text()
        assert not re.search(r"AKIA[0-9A-Z]{12,}", text), p
        assert not re.search(r"(?i)aws_(secret_access_key|session_token|access_key_id)\s*[:=]", text), p
