"""deploy/k8s: every object valid against the Kubernetes schemas (offline), the overlays rendered by
kustomize when it is installed, and the wiring checked against this project's own code:
every command and probe is a real subcommand with real flags, every ANTI_SUS_/GALLERY_BRIDGE_/NOMAD_
variable is a real setting, Services select pods that expose their ports, and the NetworkPolicies
let only nomad reach the broker's frontend and only workers its backend.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Any, Iterator

import kubernetes_validate
import pytest
import yaml

from tests.conftest import REPO

K8S = REPO / "deploy" / "k8s"
BASE = K8S / "base"
OVERLAYS = ("small", "scale")
# The oldest Kubernetes still supported by its maintainers when this was written, and the newest bundled schema.
VERSIONS = ("1.30", kubernetes_validate.latest_version())
KUSTOMIZE: list[str] | None = (["kubectl", "kustomize"] if shutil.which("kubectl")
                               else ["kustomize", "build"] if shutil.which("kustomize") else None)
needs_kustomize = pytest.mark.skipif(KUSTOMIZE is None, reason="neither kubectl nor kustomize is installed: "
                                     "the overlays are not rendered (the base is still validated and checked)")
WORKLOADS = ("Deployment", "StatefulSet", "Job")


# -- loading and rendering -----------------------------------------------------------------------------

def base_objects() -> list[dict]:
    """The base's objects read straight from its files (no kustomize needed)."""
    kust = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    docs: list[dict] = []
    for name in kust["resources"]:
        docs += [d for d in yaml.safe_load_all((BASE / name).read_text()) if d]
    return docs


def render(path: Path) -> list[dict]:
    assert KUSTOMIZE is not None
    out = subprocess.run([*KUSTOMIZE, str(path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    if KUSTOMIZE is None:
        pytest.skip("neither kubectl nor kustomize is installed")
    return {name: render(K8S / "overlays" / name) for name in OVERLAYS}


@pytest.fixture(scope="module")
def secrets_rendered(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """deploy/k8s/secrets rendered the way the docs say: examples copied, keys made with `anti-sus keygen`."""
    if KUSTOMIZE is None:
        pytest.skip("neither kubectl nor kustomize is installed")
    from photocore.curve import keygen

    d = tmp_path_factory.mktemp("secrets") / "secrets"
    shutil.copytree(K8S / "secrets", d)
    for example in d.glob("*.env.example"):
        shutil.copy(example, d / example.name.removesuffix(".example"))
    (d / "web-token").write_text("a-test-token-that-is-long-enough\n")
    keygen(d / "keys", "backend")
    keygen(d / "keys", "worker")
    return render(d)


def objects_of(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def pod_specs(docs: list[dict]) -> Iterator[tuple[dict, dict]]:
    """(workload, pod spec) of every Deployment, StatefulSet and Job."""
    for d in docs:
        if d["kind"] in WORKLOADS:
            yield d, d["spec"]["template"]["spec"]


def containers(docs: list[dict]) -> Iterator[tuple[dict, dict]]:
    for workload, spec in pod_specs(docs):
        for c in spec.get("containers", []) + spec.get("initContainers", []):
            yield workload, c


def pod_labels(docs: list[dict]) -> list[tuple[dict, dict]]:
    return [(w, w["spec"]["template"]["metadata"]["labels"]) for w, _ in pod_specs(docs)]


def selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in (selector.get("matchLabels", selector)).items())


# -- schema validation ------------------------------------------------------------------------------------

@pytest.fixture()
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a connection fails the test: the validator must use its bundled schemas."""
    def refuse(*_a: Any, **_k: Any) -> None:
        raise AssertionError("the schema validation tried to use the network")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def validate_all(docs: list[dict]) -> None:
    for doc in docs:
        for version in VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                raise AssertionError(f"{doc['kind']}/{doc['metadata']['name']} (Kubernetes {version}): {exc.message} "
                                     f"at {'/'.join(map(str, exc.path))}") from None


def test_base_objects_are_valid_offline(no_network: None) -> None:
    docs = base_objects()
    assert {d["kind"] for d in docs} >= {"Deployment", "StatefulSet", "Job", "Service", "PersistentVolumeClaim",
                                         "HorizontalPodAutoscaler", "NetworkPolicy"}
    validate_all(docs)


def test_the_validator_catches_mistakes(no_network: None) -> None:
    """A misspelt field and a wrong type are refused, so a pass above means something."""
    worker = objects_of(base_objects(), "Deployment")["anti-sus-worker"]
    typo = yaml.safe_load(yaml.safe_dump(worker))
    typo["spec"]["template"]["spec"]["containers"][0]["comand"] = ["x"]
    wrong_type = yaml.safe_load(yaml.safe_dump(worker))
    wrong_type["spec"]["replicas"] = "two"
    for bad in (typo, wrong_type):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(bad, VERSIONS[0], strict=True)


@needs_kustomize
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlays_render_and_are_valid(rendered: dict[str, list[dict]], overlay: str, no_network: None) -> None:
    docs = rendered[overlay]
    validate_all(docs)
    assert {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"} == {"photo-mining"}
    assert all(d["metadata"]["labels"]["app.kubernetes.io/part-of"] == "photo-mining" for d in docs if d["kind"] != "Namespace")


@needs_kustomize
def test_secrets_render_from_local_files_and_are_valid(secrets_rendered: list[dict], no_network: None) -> None:
    validate_all(secrets_rendered)
    names = set(objects_of(secrets_rendered, "Secret"))
    # Every Secret a workload of any overlay names is made here, under that very name.
    for overlay in OVERLAYS:
        for name in secret_names(render(K8S / "overlays" / overlay)):
            assert name in names, f"{overlay} uses Secret {name}, which deploy/k8s/secrets does not make"


def test_no_secret_values_are_committed() -> None:
    """Secrets come from files the operator makes; the repository holds only empty examples."""
    for path in K8S.rglob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            assert not (doc and doc.get("kind") == "Secret"), f"{path} commits a Secret"
    ignored = (K8S / "secrets" / ".gitignore").read_text().split()
    assert {"*.env", "web-token", "keys/"} <= set(ignored)
    for example in (K8S / "secrets").glob("*.env.example"):
        for line in example.read_text().splitlines():
            if line and not line.startswith("#"):
                assert re.fullmatch(r"[A-Z0-9_]+=", line), f"{example.name}: {line!r} holds a value"
    listed = subprocess.run(["git", "ls-files", "deploy/k8s/secrets"], cwd=REPO, capture_output=True, text=True).stdout
    assert not re.search(r"\.env$|web-token|\.key(_secret)?$", listed, re.M), listed


def secret_names(docs: list[dict]) -> set[str]:
    names: set[str] = set()
    for _, spec in pod_specs(docs):
        for v in spec.get("volumes", []):
            if "secret" in v:
                names.add(v["secret"]["secretName"])
        for c in spec["containers"]:
            for ref in c.get("envFrom", []):
                if "secretRef" in ref:
                    names.add(ref["secretRef"]["name"])
    return names


# -- the commands in the manifests are this project's ----------------------------------------------------

def sub_parser(ap: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    action = next(a for a in ap._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[name]


def parse(cmd: list[str], env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> tuple[argparse.Namespace, str]:
    """Parse a container command with the project's own parser under the container's environment;
    (namespace, the subcommand's --help text)."""
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    try:
        if cmd[0] == "anti-sus":
            from anti_sus.cli import build_parser as anti_sus_parser
            ap = anti_sus_parser()
        elif cmd[0] == "gallery-bridge":
            from gallery_bridge.cli import build_parser as gallery_parser
            ap = gallery_parser()
        elif cmd[0] == "nomad":
            from nomad.cli import build_parser as nomad_parser
            ap = nomad_parser(dict(os.environ))
        elif cmd[:3] == ["python", "-m", "stack.ensure_models"]:
            from stack.ensure_models import parser as models_parser
            args = models_parser().parse_args(cmd[3:])
            return args, models_parser().format_help()
        else:
            raise AssertionError(f"not a command of this project: {cmd}")
        try:
            args = ap.parse_args(cmd[1:])
        except SystemExit:
            raise AssertionError(f"{cmd} does not parse") from None
        return args, sub_parser(ap, cmd[1]).format_help()
    finally:
        for k in env:
            monkeypatch.delenv(k, raising=False)


def check_commands(docs: list[dict], monkeypatch: pytest.MonkeyPatch) -> dict[str, argparse.Namespace]:
    """Every command and exec probe parses; every variable of ours is one the command reads."""
    parsed: dict[str, argparse.Namespace] = {}
    for workload, c in containers(docs):
        env = {e["name"]: e["value"] for e in c.get("env", []) if "value" in e}
        args, helptext = parse(c["command"], env, monkeypatch)
        parsed[f"{workload['metadata']['name']}/{c['name']}"] = args
        for name in env:
            if name.startswith(("ANTI_SUS_", "GALLERY_BRIDGE_", "NOMAD_", "STACK_")):
                assert name in helptext, f"{workload['metadata']['name']}/{c['name']}: {name} is not a setting of {c['command'][:2]}"
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            if "exec" in c.get(probe, {}):
                parse(c[probe]["exec"]["command"], {}, monkeypatch)
    return parsed


def test_base_commands_and_probes_are_real(monkeypatch: pytest.MonkeyPatch) -> None:
    parsed = check_commands(base_objects(), monkeypatch)
    broker, worker = parsed["anti-sus-broker/broker"], parsed["anti-sus-worker/worker"]
    assert broker.frontend == ["tcp://0.0.0.0:7777"] and broker.backend == ["tcp://0.0.0.0:7779"]
    assert worker.connect == "tcp://anti-sus-broker-backend:7779" and worker.metrics_port == 9100
    assert worker.metrics_host == "0.0.0.0", "the kubelet probes the pod's address, not its loopback"
    nomad = parsed["nomad/nomad"]
    assert nomad.anti_sus == "tcp://anti-sus-broker:7777" and nomad.gallery == "tcp://gallery-bridge:7778"
    assert nomad.state_dir == Path("/state") or str(nomad.state_dir) == "/state"
    assert parsed["gallery-bridge/web"].connect == "tcp://127.0.0.1:7778"


@needs_kustomize
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_commands_are_real(rendered: dict[str, list[dict]], overlay: str, monkeypatch: pytest.MonkeyPatch) -> None:
    parsed = check_commands(rendered[overlay], monkeypatch)
    worker = parsed["anti-sus-worker/worker"]
    if overlay == "scale":  # CURVE on the backend: the broker has the allow-list, the worker its keys
        broker = parsed["anti-sus-broker/broker"]
        assert broker.backend_curve_secret_key and broker.backend_curve_allow
        assert worker.curve_server_key and worker.curve_client_key
    else:
        assert worker.curve_server_key is None


# -- ports, selectors, volumes ----------------------------------------------------------------------------

def container_ports(spec: dict) -> dict[str | int, int]:
    ports: dict[str | int, int] = {}
    for c in spec["containers"]:
        for p in c.get("ports", []):
            ports[p["containerPort"]] = p["containerPort"]
            if "name" in p:
                ports[p["name"]] = p["containerPort"]
    return ports


def check_wiring(docs: list[dict]) -> None:
    workloads = list(pod_specs(docs))
    labels = pod_labels(docs)
    # A Service selects exactly one workload, and each of its target ports is a port of that pod.
    for name, svc in objects_of(docs, "Service").items():
        hits = [(w, spec) for (w, spec), (_, lab) in zip(workloads, labels) if selects(svc["spec"]["selector"], lab)]
        assert len(hits) == 1, f"Service {name} selects {len(hits)} workloads"
        ports = container_ports(hits[0][1])
        for p in svc["spec"]["ports"]:
            assert p.get("targetPort", p["port"]) in ports, f"Service {name}: target {p.get('targetPort')} is not a pod port"
            assert ports[p.get("targetPort", p["port"])] == p["port"], f"Service {name}: port {p['port']} maps elsewhere"
    # A Deployment's and StatefulSet's selector matches its own template.
    for w, lab in labels:
        if w["kind"] != "Job":
            assert selects(w["spec"]["selector"], lab), w["metadata"]["name"]
    # Every claim a pod mounts exists (or is the StatefulSet's own template).
    claims = set(objects_of(docs, "PersistentVolumeClaim"))
    for w, spec in workloads:
        own = {t["metadata"]["name"] for t in w["spec"].get("volumeClaimTemplates", [])}
        vols = {v["name"] for v in spec.get("volumes", [])} | own
        for v in spec.get("volumes", []):
            if "persistentVolumeClaim" in v:
                assert v["persistentVolumeClaim"]["claimName"] in claims, (w["metadata"]["name"], v)
        for c in spec["containers"]:
            for m in c.get("volumeMounts", []):
                assert m["name"] in vols, (w["metadata"]["name"], c["name"], m["name"])
            # Probes name ports the container has.
            for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                for how in ("httpGet", "tcpSocket"):
                    if how in c.get(probe, {}):
                        assert c[probe][how]["port"] in container_ports({"containers": [c]}), (c["name"], probe)
    # The HPA scales a Deployment that asks for CPU (utilisation is measured against the request).
    deployments = objects_of(docs, "Deployment")
    for name, hpa in objects_of(docs, "HorizontalPodAutoscaler").items():
        target = deployments[hpa["spec"]["scaleTargetRef"]["name"]]
        for c in target["spec"]["template"]["spec"]["containers"]:
            assert "cpu" in c["resources"]["requests"], name
        assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    # Every pod runs as the image's unprivileged user.
    for w, spec in workloads:
        assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] == 10001, w["metadata"]["name"]
        for c in spec["containers"]:
            assert c["securityContext"]["allowPrivilegeEscalation"] is False


def test_base_wiring() -> None:
    check_wiring(base_objects())


@needs_kustomize
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_wiring(rendered: dict[str, list[dict]], overlay: str) -> None:
    docs = rendered[overlay]
    check_wiring(docs)
    worker = objects_of(docs, "Deployment")["anti-sus-worker"]["spec"]["template"]["spec"]["containers"][0]
    threads = {e["name"]: e.get("value") for e in worker["env"]}["ANTI_SUS_THREADS"]
    assert threads == str(worker["resources"]["requests"]["cpu"]), "one ONNX Runtime thread per requested core"
    models = objects_of(docs, "PersistentVolumeClaim")["models"]
    assert models["spec"]["accessModes"] == (["ReadWriteOnce"] if overlay == "small" else ["ReadWriteMany"])


def test_broker_backend_is_published_before_the_broker_is_ready() -> None:
    """The broker turns ready only once a worker has joined: a readiness-gated backend would lock both out."""
    svcs = objects_of(base_objects(), "Service")
    assert svcs["anti-sus-broker-backend"]["spec"].get("publishNotReadyAddresses") is True
    assert not svcs["anti-sus-broker"]["spec"].get("publishNotReadyAddresses")
    assert [p["port"] for p in svcs["anti-sus-broker"]["spec"]["ports"]] == [7777]
    assert [p["port"] for p in svcs["anti-sus-broker-backend"]["spec"]["ports"]] == [7779]


# -- NetworkPolicies ----------------------------------------------------------------------------------------

def allowed_sources(docs: list[dict], target: str, port: int) -> set[str] | None:
    """Workloads whose pods may reach ``port`` of ``target``'s pods (None: anything may)."""
    labels = pod_labels(docs)
    target_labels = next(lab for w, lab in labels if w["metadata"]["name"] == target)
    policies = [p for p in objects_of(docs, "NetworkPolicy").values() if selects(p["spec"]["podSelector"], target_labels)
                and "Ingress" in p["spec"]["policyTypes"]]
    assert policies, f"no policy isolates {target}"
    sources: set[str] = set()
    for policy in policies:
        for rule in policy["spec"].get("ingress", []):
            if "ports" in rule and port not in [p["port"] for p in rule["ports"]]:
                continue
            if "from" not in rule:
                return None
            for peer in rule["from"]:
                assert set(peer) == {"podSelector"}, f"{policy['metadata']['name']}: only pod selectors expected"
                sources |= {w["metadata"]["name"] for w, lab in labels if selects(peer["podSelector"], lab)}
    return sources


def check_policies(docs: list[dict]) -> None:
    assert allowed_sources(docs, "anti-sus-broker", 7777) == {"nomad"}
    assert allowed_sources(docs, "anti-sus-broker", 7779) == {"anti-sus-worker"}
    assert allowed_sources(docs, "gallery-bridge", 7778) == {"nomad"}
    assert allowed_sources(docs, "gallery-bridge", 8780) is None  # the web app, for an Ingress in front
    for quiet in ("anti-sus-worker", "nomad"):
        assert allowed_sources(docs, quiet, 9100) == set(), f"{quiet} takes no connections"
    # The ports the policies open are the ports the broker's command binds.
    broker = objects_of(docs, "Deployment")["anti-sus-broker"]["spec"]["template"]["spec"]["containers"][0]
    bound = {int(m) for m in re.findall(r"tcp://0\.0\.0\.0:(\d+)", " ".join(broker["command"]))}
    assert bound == {7777, 7779}


def test_base_network_policies() -> None:
    check_policies(base_objects())


@needs_kustomize
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_network_policies(rendered: dict[str, list[dict]], overlay: str) -> None:
    check_policies(rendered[overlay])


def test_docs_describe_the_manifests() -> None:
    doc = (REPO / "docs" / "scaling.md").read_text()
    for needle in ("deploy/k8s/overlays/small", "deploy/k8s/overlays/scale", "kubectl apply -k deploy/k8s/secrets",
                   "anti-sus keygen", "7777", "7779", "7778", "8780", "publishNotReadyAddresses"):
        assert needle in doc, needle
