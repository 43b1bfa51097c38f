"""cluster/: the launcher config validates against the schema Ray ships, the KubeRay manifest is complete, and
every file and entrypoint they name exists."""

import importlib.util
import json
import re
from pathlib import Path

import jsonschema
import tomllib
import yaml

from gl_ray.shipped import find_shipped

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
RAY_DIR = Path(importlib.util.find_spec("ray").origin).parent  # not imported: see gl_ray.ray_utils.ensure_ray


def ray_version() -> str:
    from importlib.metadata import version

    return version("ray")


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_aws_config_validates_against_rays_autoscaler_schema():
    schema = json.loads((RAY_DIR / "autoscaler" / "ray-schema.json").read_text())
    cfg = yaml.safe_load((CLUSTER / "aws-gpu.yaml").read_text())
    jsonschema.validate(cfg, schema)
    assert cfg["head_node_type"] in cfg["available_node_types"]
    starts = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in starts  # the dashboard/job port is not opened to the internet
    torch = [c for c in cfg["setup_commands"] if "install" in c and " torch" in c]
    assert len(torch) == 1 and f"torch=={ci_torch()} " in torch[0] and "/whl/cu128" in torch[0]  # the image's


def test_kuberay_rayjob_has_the_required_fields():
    job = yaml.safe_load((CLUSTER / "kuberay-rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob" and job["metadata"]["name"]
    spec = job["spec"]
    command, config = spec["entrypoint"].split(" --config ")
    assert command == "gl-ray train" and find_shipped(config.split()[0], "configs").is_file()  # in the image
    cluster = spec["rayClusterSpec"]
    images = {c["image"] for g in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
              for c in g["template"]["spec"]["containers"]}
    assert images == {f"ghcr.io/YOUR_ORG/gl-ray:{pyproject()['project']['version']}"}  # the Dockerfile's tag
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


def ci_torch() -> str:
    """The torch that CI and `make` install (the Makefile's pin)."""
    return re.search(r"install --quiet torch==([\d.]+)\n", (REPO / "Makefile").read_text())[1]


def test_the_dockerfile_matches_the_pins_and_lints_clean():
    """cluster/Dockerfile, parsed by Docker's own parser: Ray, Python and CUDA of its base agree with pyproject
    and the torch build, the extras exist, and hadolint's basic rules hold."""
    import dockerfile

    commands = dockerfile.parse_file(str(CLUSTER / "Dockerfile"))
    base = [c.value[0] for c in commands if c.cmd == "FROM"]
    assert len(base) == 1
    image, tag = base[0].split(":")
    ray, py_major, py_minor, cuda = re.fullmatch(r"([\d.]+)-py(\d)(\d+)-cu(\d+)", tag).groups()
    project = pyproject()["project"]
    assert image == "rayproject/ray" and ray == ray_version()
    assert any(d.startswith("ray[") and d.endswith(f"=={ray}") for d in project["dependencies"])
    low, high = re.fullmatch(r">=3\.(\d+),<3\.(\d+)", project["requires-python"]).groups()
    assert py_major == "3" and int(low) <= int(py_minor) < int(high)
    runs = [c.value[0] for c in commands if c.cmd == "RUN"]
    torch = [r for r in runs if "torch==" in r]
    assert len(torch) == 1 and f"torch=={ci_torch()} " in torch[0] and torch[0].endswith(f"/whl/cu{cuda}")
    extras = re.search(r'pip install --no-cache-dir "\.\[([\w,]+)\]"', " ".join(runs))[1].split(",")
    assert extras == ["cluster"] and set(extras) <= set(project["optional-dependencies"])
    # hadolint: DL3007 (no :latest), DL3020 (COPY, not ADD), DL3042 (pip --no-cache-dir), DL3004 (no sudo)
    assert tag != "latest" and not any(c.cmd == "ADD" for c in commands)
    assert all("--no-cache-dir" in r for r in runs if "pip install" in r)
    assert not any("sudo " in r for r in runs)
    copies = [c for c in commands if c.cmd == "COPY"]
    assert copies and all("--chown=ray:users" in c.flags for c in copies)  # the base image runs as `ray`
    for c in copies:  # every copied path exists, and .dockerignore lets it into the context
        assert all((REPO / src).exists() for src in c.value[:-1])
    allowed = {line[1:] for line in (REPO / ".dockerignore").read_text().splitlines() if line.startswith("!")}
    assert {src for c in copies for src in c.value[:-1]} <= allowed
