"""The Kubernetes example (deploy/kubernetes): the gateway finds the replicas it is meant to find.

Read as YAML, no cluster: the gateway's ``--selector`` labels are the replica pods' labels, its
``--service-discovery-port`` is the port the scheduler container listens on (``--port``), the
gateway may list and watch pods in its namespace, and every manifest kustomize lists exists.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"


def manifests(name: str) -> dict[str, dict[str, Any]]:
    docs = yaml.safe_load_all((DEPLOY / name).read_text())
    return {doc["kind"]: doc for doc in docs if doc}


def container(workload: dict[str, Any], name: str) -> dict[str, Any]:
    containers = workload["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == name)


def flag_values(args: list[str], flag: str) -> list[str]:
    """The values after ``flag`` (``--flag=v`` or ``--flag v1 v2 ...`` up to the next flag)."""
    for index, arg in enumerate(args):
        if arg.startswith(f"{flag}="):
            return [arg.split("=", 1)[1]]
        if arg == flag:
            rest = args[index + 1 :]
            end = next((i for i, a in enumerate(rest) if a.startswith("--")), len(rest))
            return rest[:end]
    raise AssertionError(f"{flag} not in {args}")


def test_the_gateway_selects_the_replica_pods_on_the_schedulers_port() -> None:
    replicas = manifests("replicas.yaml")["StatefulSet"]
    gateway = container(manifests("gateway.yaml")["Deployment"], "smg")["args"]
    pod_labels = replicas["spec"]["template"]["metadata"]["labels"]
    selector = dict(s.split("=", 1) for s in flag_values(gateway, "--selector"))
    assert selector and selector.items() <= pod_labels.items()
    scheduler = container(replicas, "scheduler")["args"]
    assert flag_values(gateway, "--service-discovery-port") == flag_values(scheduler, "--port")
    assert "--service-discovery" in gateway
    assert flag_values(gateway, "--model-path") == flag_values(scheduler, "--model")


def test_the_gateway_may_watch_pods_and_kustomize_lists_every_manifest() -> None:
    gateway = manifests("gateway.yaml")
    rule = gateway["Role"]["rules"][0]
    assert "pods" in rule["resources"] and {"list", "watch"} <= set(rule["verbs"])
    account = gateway["Deployment"]["spec"]["template"]["spec"]["serviceAccountName"]
    assert gateway["RoleBinding"]["subjects"][0]["name"] == account
    listed = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())["resources"]
    assert sorted(listed) == sorted(
        p.name for p in DEPLOY.glob("*.yaml") if p.stem != "kustomization"
    )
