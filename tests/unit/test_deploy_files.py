"""The deployment examples in deploy/ stay usable: they parse, name configs that exist and
validate, and the Ray cluster launcher file passes Ray's own schema."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from pdserve.cluster.config import load_config

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"


def _configs_named(text: str) -> set[str]:
    return set(re.findall(r"configs/[\w.-]+\.yaml", text))


@pytest.mark.parametrize("name", ["ray-cluster.yaml", "kuberay/raycluster.yaml",
                                  "kuberay/rayjob.yaml", "job_submit.sh"])
def test_deploy_file_names_configs_that_validate(name):
    text = (DEPLOY / name).read_text()
    named = _configs_named(text)
    assert named, f"{name} names no config"
    for rel in named:
        load_config(ROOT / rel)


def test_ray_cluster_launcher_yaml_passes_rays_schema():
    jsonschema = pytest.importorskip("jsonschema")
    spec = importlib.util.find_spec("ray")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("ray is not installed")
    schema_path = Path(list(spec.submodule_search_locations)[0]) / "autoscaler" / "ray-schema.json"
    config = yaml.safe_load((DEPLOY / "ray-cluster.yaml").read_text())
    jsonschema.validate(config, json.loads(schema_path.read_text()))
    types = config["available_node_types"]
    assert {"prefill_node", "decode_node"} <= {r for t in types.values() for r in t["resources"]}


def test_kuberay_manifests():
    cluster, service = yaml.safe_load_all((DEPLOY / "kuberay" / "raycluster.yaml").read_text())
    assert cluster["kind"] == "RayCluster" and service["kind"] == "Service"
    groups = {g["groupName"]: g for g in cluster["spec"]["workerGroupSpecs"]}
    for pool in ("prefill", "decode"):
        assert f"{pool}_node" in groups[pool]["rayStartParams"]["resources"]
        limits = groups[pool]["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert limits["nvidia.com/gpu"] == "1"
    assert service["spec"]["ports"][0]["port"] == 50051
    assert service["spec"]["selector"]["ray.io/node-type"] == "head"
    (job,) = yaml.safe_load_all((DEPLOY / "kuberay" / "rayjob.yaml").read_text())
    assert job["kind"] == "RayJob"
    assert job["spec"]["entrypoint"].startswith("python -m pdserve.cluster serve configs/")
    assert job["spec"]["clusterSelector"]["ray.io/cluster"] == cluster["metadata"]["name"]


def test_job_submit_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(DEPLOY / "job_submit.sh")], check=True)


def test_grafana_dashboard_queries_only_metrics_the_router_exports():
    from prometheus_client.parser import text_string_to_metric_families

    from pdserve.messages import WorkerStats
    from pdserve.router.lifecycle import RouterCounters
    from pdserve.router.metrics import RouterMetrics

    metrics = RouterMetrics("m", 512, RouterCounters())
    metrics.observe_worker_stats([
        WorkerStats("prefill-0", "prefill", free_blocks=1, total_blocks=2, running=0,
                    waiting=0, prompt_tokens=0, generated_tokens=0),
        WorkerStats("decode-0", "decode", free_blocks=1, total_blocks=2, running=0,
                    waiting=0, prompt_tokens=0, generated_tokens=0),
    ])
    exported = set()
    for family in text_string_to_metric_families(metrics.exposition().decode()):
        exported |= {family.name} | {s.name for s in family.samples}
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "pdserve-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {name for e in exprs for name in re.findall(r"pdserve:[a-z0-9_]+", e)}
    assert len(dashboard["panels"]) >= 10 and len(used) >= 15
    assert used <= exported, sorted(used - exported)


def test_kuberay_service_exposes_the_http_api_of_the_config():
    _, service = yaml.safe_load_all((DEPLOY / "kuberay" / "raycluster.yaml").read_text())
    router = load_config(ROOT / "configs" / "multinode.yaml").router
    ports = {p["name"]: p["port"] for p in service["spec"]["ports"]}
    assert ports == {"grpc": router.port, "http": router.http_port}
    assert router.http_host == "0.0.0.0" and router.auth_token_env
