"""deploy/: the Kubernetes manifests validate against Kubernetes' schemas, the image is built on the vLLM
version the kit supports, and the container's start keeps the plugin in charge. No cluster runs here:
what a cluster would do with them is not tested."""

import re
import subprocess
import sys
import tomllib

from packaging.requirements import Requirement
from packaging.version import Version

from helpers import ROOT

DEPLOY = ROOT / "deploy"


def validate(*paths) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "kubernetes_validate", "--strict", *map(str, paths)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_manifests_validate_strictly():
    manifests = sorted((DEPLOY / "k8s").glob("*.yaml"))
    assert {p.stem for p in manifests} == {"deployment", "service", "hpa"}
    r = validate(*manifests)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("passed") == 3


def test_a_broken_manifest_is_caught(tmp_path):
    broken = tmp_path / "deployment.yaml"
    broken.write_text((DEPLOY / "k8s" / "deployment.yaml").read_text().replace("replicas: 1", "replicas: one"))
    assert validate(broken).returncode != 0


def test_the_readiness_probe_is_vllms_health():
    text = (DEPLOY / "k8s" / "deployment.yaml").read_text()
    assert re.search(r"readinessProbe:\s+httpGet:\s+path: /health", text)
    assert "nvidia.com/gpu" in text


def test_the_image_is_built_on_a_supported_vllm():
    tag = re.search(r"^FROM vllm/vllm-openai:v([\d.]+)$", (DEPLOY / "Dockerfile").read_text(), re.M)[1]
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    supported = next(Requirement(r) for r in extras["cuda"] if r.startswith("vllm"))
    assert Version(tag) in supported.specifier, (tag, str(supported))


def test_the_container_start_keeps_the_plugin_in_charge():
    start = DEPLOY / "start.sh"
    assert subprocess.run(["bash", "-n", str(start)]).returncode == 0
    assert "--model-impl vllm" in start.read_text()
