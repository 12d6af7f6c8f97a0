"""The production manifests in deploy/ are valid, consistent, and name only real settings.

Offline and quick (a few seconds); no cluster and no Docker engine:

* ``deploy/k8s`` is rendered the way ``kubectl apply -k deploy/k8s`` renders it, by a small
  renderer of the kustomize fields the folder uses (``resources``, ``namespace``,
  ``images``; any other field fails the test instead of being ignored). Where kubectl is
  installed, its own ``kubectl kustomize`` output is compared with the renderer's.
* Every object of a built-in kind is validated against the Kubernetes JSON schemas that
  ``kubernetes-validate`` ships (strict: an unknown field fails), for each version in
  ``KUBERNETES_VERSIONS``, with sockets blocked: the schemas are local files.
* Custom resources (KEDA, Strimzi, Prometheus Operator) have no schema there, so the
  schema step is skipped for them and each kind gets an explicit check instead: its
  apiVersion and kind, required fields, allowed ``spec`` keys and value types.
* The objects refer to each other correctly (selectors, ConfigMaps, Secrets, claims,
  named ports, the autoscalers' targets, the monitors' ports); pods are hardened (the
  restricted Pod Security Standard, read-only root filesystems) and bounded (requests
  and limits); Triton runs on a GPU with explicit model control.
* Every ``SHOPREC_*`` variable in the manifests and in ``deploy/compose.yaml`` is a field of
  ``shoprec.settings.Settings`` (or in ``NOT_YET_SETTINGS``) and its value parses.
* The Kafka topics are the code's topics with replication factor 3 and
  ``min.insync.replicas=2``; the compose file's services, volumes and files exist.
"""

from __future__ import annotations

import copy
import re
import shutil
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped,unused-ignore]
import pytest
import yaml  # type: ignore[import-untyped,unused-ignore]
from pydantic import ValidationError

from shoprec.settings import ENV_PREFIX, Settings
from streams.topics import CATALOG, CONTROL, DLQ, EVENT_TOPICS, RECS_OUT

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE_FILES = (DEPLOY / "compose.yaml", DEPLOY / "compose.gpu.yaml")
TRITON_DOCKERFILE = DEPLOY / "docker" / "triton.Dockerfile"

# The oldest Kubernetes the manifests promise to work on, and a current one.
KUBERNETES_VERSIONS = ("1.31", "1.34")

# SHOPREC_* names the manifests set before shoprec.settings.Settings has them: the
# learner's (`shoprec learner`, issue 13).  Remove a name when its setting lands
# (test_not_yet_settings_are_not_settings_yet fails as a reminder).
NOT_YET_SETTINGS: frozenset[str] = frozenset()

INPUT_TOPICS = frozenset(EVENT_TOPICS.values())
ALL_TOPICS = INPUT_TOPICS | {CATALOG, RECS_OUT, DLQ, CONTROL}

Manifest = dict[str, Any]

KUSTOMIZATION_FIELDS = frozenset({"apiVersion", "kind", "namespace", "resources", "images"})
CLUSTER_SCOPED = frozenset(
    {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume", "StorageClass"}
)
WORKLOADS = frozenset({"Deployment", "StatefulSet", "DaemonSet", "Job"})


# --- loading and rendering ---------------------------------------------------------------


def _mapping_without_duplicates(loader: Any, node: Any, deep: bool = False) -> Any:
    keys = [
        loader.construct_object(key, deep=deep)
        for key, _ in node.value
        if key.tag != "tag:yaml.org,2002:merge"  # `<<: *anchor` (compose) is no duplicate
    ]
    duplicated = sorted({str(k) for k in keys if keys.count(k) > 1})
    if duplicated:
        raise yaml.constructor.ConstructorError(
            None, None, f"duplicate keys {duplicated}", node.start_mark
        )
    return loader.construct_mapping(node, deep=deep)


# PyYAML keeps the last of two equal keys without a word (a second `env:` would silently
# drop the first); kubectl refuses such a file, and so does this loader.
_StrictLoader: Any = type("_StrictLoader", (yaml.SafeLoader,), {})
_StrictLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates
)


def load_documents(path: Path) -> list[Manifest]:
    """The non-empty YAML documents of one file; each must be a mapping."""
    with path.open(encoding="utf-8") as f:
        docs = [d for d in yaml.load_all(f, Loader=_StrictLoader) if d is not None]
    for d in docs:
        assert isinstance(d, dict), f"{path}: a YAML document that is not a mapping"
    return docs


def _split_image(image: str) -> tuple[str, str]:
    """``registry/name:tag`` or ``name@sha256:...`` into (name, ":tag" / "@digest")."""
    if "@" in image:
        name, digest = image.split("@", 1)
        return name, "@" + digest
    slash = image.rfind("/")
    colon = image.rfind(":")
    if colon > slash:
        return image[:colon], image[colon:]
    return image, ""


def pod_specs(obj: Manifest) -> Iterator[Manifest]:
    """The pod spec of a workload (none for other kinds)."""
    if obj["kind"] in WORKLOADS:
        yield obj["spec"]["template"]["spec"]
    elif obj["kind"] == "CronJob":
        yield obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    elif obj["kind"] == "Pod":
        yield obj["spec"]


def containers(pod: Manifest) -> Iterator[Manifest]:
    yield from pod.get("initContainers", [])
    yield from pod["containers"]


def _set_images(obj: Manifest, images: list[Manifest]) -> None:
    for pod in pod_specs(obj):
        for c in containers(pod):
            name, suffix = _split_image(c["image"])
            for rule in images:
                if rule["name"] != name:
                    continue
                unknown = set(rule) - {"name", "newName", "newTag", "digest"}
                assert not unknown, f"images: {sorted(unknown)} not handled by render()"
                if "digest" in rule:
                    suffix = "@" + rule["digest"]
                elif "newTag" in rule:
                    suffix = ":" + str(rule["newTag"])
                c["image"] = rule.get("newName", name) + suffix


def render(directory: Path) -> list[Manifest]:
    """What ``kubectl kustomize DIRECTORY`` gives, for the fields this repository uses."""
    (kustomization,) = load_documents(directory / "kustomization.yaml")
    unknown = set(kustomization) - KUSTOMIZATION_FIELDS
    assert not unknown, (
        f"{directory / 'kustomization.yaml'} uses {sorted(unknown)}: teach render() in "
        f"{Path(__file__).name} that field, or the manifests go unchecked"
    )
    objects: list[Manifest] = []
    for entry in kustomization.get("resources", []):
        path = directory / entry
        objects += render(path) if path.is_dir() else load_documents(path)
    namespace = kustomization.get("namespace")
    for obj in objects:
        if namespace and obj["kind"] not in CLUSTER_SCOPED:
            obj["metadata"]["namespace"] = namespace
        _set_images(obj, kustomization.get("images", []))
    return objects


def referenced_files(directory: Path) -> set[Path]:
    """Every file a kustomization reaches, kustomization.yaml files included."""
    (kustomization,) = load_documents(directory / "kustomization.yaml")
    found = {directory / "kustomization.yaml"}
    for entry in kustomization.get("resources", []):
        path = (directory / entry).resolve()
        found |= referenced_files(path) if path.is_dir() else {path}
    return found


RENDERED = render(K8S)
EXAMPLES = [doc for p in sorted(K8S.rglob("*.example.yaml")) for doc in load_documents(p)]
ALL_OBJECTS = RENDERED + EXAMPLES


def name_of(obj: Manifest) -> str:
    ns = obj["metadata"].get("namespace", "")
    return f"{obj['kind']}/{ns + '/' if ns else ''}{obj['metadata']['name']}"


def objects_of(kind: str, namespace: str | None = None) -> list[Manifest]:
    return [
        o
        for o in ALL_OBJECTS
        if o["kind"] == kind and (namespace is None or o["metadata"].get("namespace") == namespace)
    ]


def one(kind: str, name: str) -> Manifest:
    (obj,) = [o for o in ALL_OBJECTS if o["kind"] == kind and o["metadata"]["name"] == name]
    return obj


def dig(obj: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(obj, dict) or key not in obj:
            return None
        obj = obj[key]
    return obj


def matches(selector: Manifest, labels: dict[str, str]) -> bool:
    """Kubernetes label-selector semantics (matchLabels and matchExpressions)."""
    for key, value in selector.get("matchLabels", {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


def workloads(namespace: str | None) -> list[Manifest]:
    """The objects that run pods, in one namespace or in all."""
    return [
        o
        for o in RENDERED
        if o["kind"] in WORKLOADS | {"CronJob", "Pod"}
        and namespace in (None, o["metadata"].get("namespace"))
    ]


def pod_labels(obj: Manifest) -> dict[str, str]:
    if obj["kind"] == "Pod":
        return dict(obj["metadata"].get("labels", {}))
    template = obj["spec"]["jobTemplate"]["spec"] if obj["kind"] == "CronJob" else obj["spec"]
    return dict(template["template"]["metadata"].get("labels", {}))


def container_ports(obj: Manifest) -> dict[str, int]:
    return {
        p["name"]: p["containerPort"]
        for pod in pod_specs(obj)
        for c in pod["containers"]
        for p in c.get("ports", [])
        if "name" in p
    }


def configmap_data() -> dict[str, str]:
    (cm,) = objects_of("ConfigMap")
    data: dict[str, str] = cm["data"]
    return data


def secret_keys(name: str, namespace: str) -> set[str]:
    for s in objects_of("Secret", namespace):
        if s["metadata"]["name"] == name:
            return set(s.get("data", {})) | set(s.get("stringData", {}))
    raise AssertionError(f"Secret {namespace}/{name} is referenced but in no manifest")


# --- files and schemas --------------------------------------------------------------------


def test_every_manifest_file_is_installed_or_an_example() -> None:
    reached = referenced_files(K8S)
    for path in sorted(K8S.rglob("*.yaml")):
        if path.name.endswith(".example.yaml"):
            assert path.resolve() not in reached, (
                f"{path} holds placeholders; a kustomization must not apply it"
            )
        else:
            assert path.resolve() in reached, f"{path} is in no kustomization: never applied"
    assert {o["kind"] for o in RENDERED} >= {
        "Deployment",
        "Service",
        "ConfigMap",
        "PodDisruptionBudget",
        "ScaledObject",
        "KafkaTopic",
    }


def test_every_object_has_a_unique_identity() -> None:
    seen: set[tuple[str, str, str]] = set()
    for obj in ALL_OBJECTS:
        for field in ("apiVersion", "kind", "metadata"):
            assert field in obj, f"an object without {field}: {obj}"
        key = (obj["kind"], obj["metadata"].get("namespace", ""), obj["metadata"]["name"])
        assert key not in seen, f"{name_of(obj)} is defined twice"
        seen.add(key)


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any socket use fails: what is validated here is validated offline."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def is_builtin(api_version: str) -> bool:
    """Core and k8s.io groups (schemas shipped); anything else is a custom resource."""
    group = api_version.rpartition("/")[0]
    return "." not in group or group.endswith(".k8s.io")


@pytest.mark.usefixtures("no_network")
@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_builtin_objects_validate_against_the_kubernetes_schemas(version: str) -> None:
    errors = []
    checked = 0
    for obj in ALL_OBJECTS:
        if not is_builtin(obj["apiVersion"]):
            continue  # no schema in kubernetes-validate: test_custom_resources checks them
        try:
            kubernetes_validate.validate(copy.deepcopy(obj), version, strict=True)
            checked += 1
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(p) for p in exc.path)
            errors.append(f"{name_of(obj)}: {where}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            errors.append(f"{name_of(obj)}: {exc.message}")
    assert errors == [], "\n".join(errors)
    assert checked >= 15


# --- custom resources (no JSON schema shipped): explicit checks --------------------------


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


@dataclass(frozen=True)
class CustomKind:
    """What is checked of a custom resource: required fields and the allowed spec keys."""

    required: tuple[tuple[str, ...], ...]
    spec_keys: frozenset[str]


CUSTOM_KINDS: dict[tuple[str, str], CustomKind] = {
    ("keda.sh/v1alpha1", "ScaledObject"): CustomKind(
        required=(("spec", "scaleTargetRef", "name"), ("spec", "triggers")),
        spec_keys=_words(
            "scaleTargetRef pollingInterval cooldownPeriod initialCooldownPeriod "
            "idleReplicaCount minReplicaCount maxReplicaCount fallback advanced "
            "triggers"
        ),
    ),
    ("keda.sh/v1alpha1", "TriggerAuthentication"): CustomKind(
        required=(("spec",),),
        spec_keys=_words(
            "secretTargetRef configMapTargetRef env podIdentity hashiCorpVault "
            "azureKeyVault awsSecretManager gcpSecretManager "
            "boundServiceAccountToken"
        ),
    ),
    ("kafka.strimzi.io/v1beta2", "KafkaTopic"): CustomKind(
        required=(
            ("metadata", "labels", "strimzi.io/cluster"),
            ("spec", "partitions"),
            ("spec", "replicas"),
        ),
        spec_keys=_words("topicName partitions replicas config"),
    ),
    ("kafka.strimzi.io/v1beta2", "KafkaUser"): CustomKind(
        required=(("metadata", "labels", "strimzi.io/cluster"), ("spec", "authentication")),
        spec_keys=_words("authentication authorization quotas template"),
    ),
    ("monitoring.coreos.com/v1", "ServiceMonitor"): CustomKind(
        required=(("spec", "selector"), ("spec", "endpoints")),
        spec_keys=_words(
            "selector endpoints namespaceSelector jobLabel targetLabels "
            "podTargetLabels sampleLimit targetLimit attachMetadata scrapeClass"
        ),
    ),
    ("monitoring.coreos.com/v1", "PodMonitor"): CustomKind(
        required=(("spec", "selector"), ("spec", "podMetricsEndpoints")),
        spec_keys=_words(
            "selector podMetricsEndpoints namespaceSelector jobLabel "
            "podTargetLabels sampleLimit targetLimit attachMetadata scrapeClass"
        ),
    ),
}

KAFKA_OPERATIONS = _words(
    "Read Write Create Delete Alter Describe ClusterAction AlterConfigs "
    "DescribeConfigs IdempotentWrite All"
)


def _custom_kind_errors(obj: Manifest) -> list[str]:
    """Type checks per kind, beyond the required fields (what the CRD schemas enforce)."""
    kind, spec, errors = obj["kind"], obj.get("spec", {}), []
    if kind == "ScaledObject":
        low, high = spec.get("minReplicaCount", 0), spec.get("maxReplicaCount", 100)
        if not (isinstance(low, int) and isinstance(high, int) and 0 <= low <= high):
            errors.append(f"replica counts {low}..{high}")
        for trigger in spec["triggers"]:
            if not isinstance(trigger.get("type"), str):
                errors.append("a trigger without type")
            metadata = trigger.get("metadata", {})
            # KEDA's metadata is map[string]string: `false` or 5 unquoted is rejected.
            bad = {k: v for k, v in metadata.items() if not isinstance(v, str)}
            if bad:
                errors.append(f"trigger metadata must be strings: {bad}")
    elif kind == "TriggerAuthentication":
        for ref in spec.get("secretTargetRef", []) + spec.get("configMapTargetRef", []):
            if set(ref) != {"parameter", "name", "key"}:
                errors.append(f"target ref {ref} needs exactly parameter, name, key")
        for ref in spec.get("env", []):
            if not {"parameter", "name"} <= set(ref) <= {"parameter", "name", "containerName"}:
                errors.append(f"env ref {ref}")
    elif kind == "KafkaTopic":
        if not (isinstance(spec["partitions"], int) and isinstance(spec["replicas"], int)):
            errors.append("partitions and replicas must be integers")
    elif kind == "KafkaUser":
        if dig(spec, "authentication", "type") not in {"scram-sha-512", "tls", "tls-external"}:
            errors.append(f"authentication type {dig(spec, 'authentication', 'type')}")
        for acl in dig(spec, "authorization", "acls") or []:
            resource = acl.get("resource", {})
            if resource.get("type") not in {"topic", "group", "cluster", "transactionalId"}:
                errors.append(f"ACL resource type {resource.get('type')}")
            if resource.get("patternType", "literal") not in {"literal", "prefix"}:
                errors.append(f"ACL patternType {resource.get('patternType')}")
            if not set(acl.get("operations", [])) <= KAFKA_OPERATIONS or not acl.get("operations"):
                errors.append(f"ACL operations {acl.get('operations')}")
    elif kind in {"ServiceMonitor", "PodMonitor"}:
        endpoints = spec.get("endpoints") or spec.get("podMetricsEndpoints") or []
        for ep in endpoints:
            if not isinstance(ep.get("port"), str):
                errors.append(f"endpoint {ep} needs a named port")
    return errors


def test_custom_resources_have_the_required_fields() -> None:
    errors = []
    custom = [o for o in ALL_OBJECTS if not is_builtin(o["apiVersion"])]
    for obj in custom:
        rule = CUSTOM_KINDS.get((obj["apiVersion"], obj["kind"]))
        if rule is None:
            errors.append(f"{name_of(obj)}: {obj['apiVersion']} has no check in CUSTOM_KINDS")
            continue
        missing = [".".join(p) for p in rule.required if dig(obj, *p) is None]
        extra = set(obj.get("spec", {})) - rule.spec_keys
        errors += [f"{name_of(obj)}: missing {m}" for m in missing]
        errors += [f"{name_of(obj)}: unknown spec key {k}" for k in sorted(extra)]
        if not set(obj) <= {"apiVersion", "kind", "metadata", "spec"}:
            errors.append(f"{name_of(obj)}: unexpected top-level {sorted(obj)}")
        if not missing:
            errors += [f"{name_of(obj)}: {e}" for e in _custom_kind_errors(obj)]
    assert errors == [], "\n".join(errors)
    assert {o["kind"] for o in custom} == {k for _, k in CUSTOM_KINDS}


# --- references between objects ------------------------------------------------------------


def test_selectors_pick_pods_and_named_ports_exist() -> None:
    errors = []
    for obj in workloads(None):
        if obj["kind"] in WORKLOADS and not matches(obj["spec"]["selector"], pod_labels(obj)):
            errors.append(f"{name_of(obj)}: its selector does not select its own pods")
        for pod in pod_specs(obj):
            ports = {p["name"] for c in containers(pod) for p in c.get("ports", [])}
            for c in containers(pod):
                for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                    port = dig(c, probe, "httpGet", "port")
                    if isinstance(port, str) and port not in ports:
                        errors.append(f"{name_of(obj)}: {probe} on unknown port {port}")
    for svc in objects_of("Service"):
        ns = svc["metadata"]["namespace"]
        selector = {"matchLabels": svc["spec"].get("selector", {})}
        backends = [w for w in workloads(ns) if matches(selector, pod_labels(w))]
        if not backends:
            errors.append(f"{name_of(svc)}: selects no pods")
        for port in svc["spec"]["ports"]:
            target = port.get("targetPort")
            if isinstance(target, str) and any(target not in container_ports(w) for w in backends):
                errors.append(f"{name_of(svc)}: targetPort {target} is not a container port")
    for pdb in objects_of("PodDisruptionBudget"):
        ns = pdb["metadata"]["namespace"]
        if not any(matches(pdb["spec"]["selector"], pod_labels(w)) for w in workloads(ns)):
            errors.append(f"{name_of(pdb)}: selects no pods")
    assert errors == [], "\n".join(errors)


def test_pods_refer_only_to_objects_that_exist() -> None:
    errors = []
    for obj in workloads(None):
        ns = obj["metadata"]["namespace"]
        for pod in pod_specs(obj):
            account = pod.get("serviceAccountName")
            if account and account not in {
                o["metadata"]["name"] for o in objects_of("ServiceAccount", ns)
            }:
                errors.append(f"{name_of(obj)}: no ServiceAccount {account}")
            volumes = {v["name"]: v for v in pod.get("volumes", [])}
            for v in volumes.values():
                if "secret" in v:
                    secret_keys(v["secret"]["secretName"], ns)
                claim = dig(v, "persistentVolumeClaim", "claimName")
                if claim and claim not in {
                    o["metadata"]["name"] for o in objects_of("PersistentVolumeClaim", ns)
                }:
                    errors.append(f"{name_of(obj)}: no PersistentVolumeClaim {claim}")
            for c in containers(pod):
                for mount in c.get("volumeMounts", []):
                    if mount["name"] not in volumes:
                        errors.append(f"{name_of(obj)}/{c['name']}: no volume {mount['name']}")
                for source in c.get("envFrom", []):
                    if "configMapRef" in source:
                        name = source["configMapRef"]["name"]
                        if name not in {o["metadata"]["name"] for o in objects_of("ConfigMap", ns)}:
                            errors.append(f"{name_of(obj)}: no ConfigMap {name}")
                    if "secretRef" in source:
                        secret_keys(source["secretRef"]["name"], ns)
                for env in c.get("env", []):
                    ref = dig(env, "valueFrom", "secretKeyRef")
                    if ref and ref["key"] not in secret_keys(ref["name"], ns):
                        errors.append(f"{name_of(obj)}: Secret {ref['name']} has no {ref['key']}")
                    ref = dig(env, "valueFrom", "configMapKeyRef")
                    maps = {o["metadata"]["name"]: o for o in objects_of("ConfigMap", ns)}
                    if ref and ref["key"] not in maps.get(ref["name"], {}).get("data", {}):
                        errors.append(f"{name_of(obj)}: no {ref['key']} in ConfigMap {ref['name']}")
    assert errors == [], "\n".join(errors)


def test_autoscalers_target_deployments_that_leave_them_the_replica_count() -> None:
    targets = [
        (h["metadata"]["namespace"], h["spec"]["scaleTargetRef"])
        for h in objects_of("HorizontalPodAutoscaler") + objects_of("ScaledObject")
    ]
    assert len(targets) == 2
    for ns, ref in targets:
        deployment = [
            d for d in objects_of("Deployment", ns) if d["metadata"]["name"] == ref["name"]
        ]
        assert len(deployment) == 1, f"autoscaler target {ref['name']} is not a Deployment"
        assert ref.get("kind", "Deployment") == "Deployment"
        # A fixed count in the manifest would reset the autoscaler's on every apply.
        assert "replicas" not in deployment[0]["spec"], f"{ref['name']} sets replicas"


def test_keda_reads_the_lag_of_the_workers_group_with_their_credentials() -> None:
    (scaled,) = objects_of("ScaledObject")
    worker = one("Deployment", scaled["spec"]["scaleTargetRef"]["name"])
    settings = configmap_data()
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "kafka"
    meta = trigger["metadata"]
    assert meta["bootstrapServers"] == settings["SHOPREC_KAFKA_BOOTSTRAP"]
    assert meta["consumerGroup"] == settings["SHOPREC_APP_ID"]
    assert (meta.get("tls") == "enable") == settings["SHOPREC_KAFKA_SECURITY_PROTOCOL"].endswith(
        "SSL"
    )
    keda_sasl = {
        "PLAIN": "plaintext",
        "SCRAM-SHA-256": "scram_sha256",
        "SCRAM-SHA-512": "scram_sha512",
    }
    assert meta["sasl"] == keda_sasl[settings["SHOPREC_KAFKA_SASL_MECHANISM"]]
    assert meta.get("allowIdleConsumers", "false") == "false"
    auth = one("TriggerAuthentication", trigger["authenticationRef"]["name"])
    ns = auth["metadata"]["namespace"]
    params = set()
    for ref in auth["spec"].get("secretTargetRef", []):
        assert ref["key"] in secret_keys(ref["name"], ns), ref
        params.add(ref["parameter"])
    (pod,) = pod_specs(worker)
    for ref in auth["spec"].get("env", []):
        (c,) = [c for c in pod["containers"] if c["name"] == ref.get("containerName", c["name"])]
        from_config = any("configMapRef" in s for s in c.get("envFrom", []))
        assert ref["name"] in settings and from_config, f"{ref['name']} is not in {c['name']}'s env"
        params.add(ref["parameter"])
    assert params >= {"username", "password", "ca"}


def test_monitors_scrape_ports_that_exist() -> None:
    errors = []
    for mon in objects_of("PodMonitor"):
        ns = mon["metadata"]["namespace"]
        pods = [w for w in workloads(ns) if matches(mon["spec"]["selector"], pod_labels(w))]
        if not pods:
            errors.append(f"{name_of(mon)}: selects no pods")
        for ep in mon["spec"]["podMetricsEndpoints"]:
            errors += [
                f"{name_of(mon)}: {name_of(w)} has no port {ep['port']}"
                for w in pods
                if ep["port"] not in container_ports(w)
            ]
    for mon in objects_of("ServiceMonitor"):
        ns = mon["metadata"]["namespace"]
        services = [
            s
            for s in objects_of("Service", ns)
            if matches(mon["spec"]["selector"], s["metadata"].get("labels", {}))
        ]
        for ep in mon["spec"]["endpoints"]:
            if not any(ep["port"] in {p.get("name") for p in s["spec"]["ports"]} for s in services):
                errors.append(f"{name_of(mon)}: no selected Service has port {ep['port']}")
    assert errors == [], "\n".join(errors)
    assert len(objects_of("PodMonitor")) + len(objects_of("ServiceMonitor")) == 3


def test_ports_agree_with_the_settings() -> None:
    settings = configmap_data()
    worker = one("Deployment", "shoprec-worker")
    assert container_ports(worker)["metrics"] == int(settings["SHOPREC_METRICS_PORT"])
    assert container_ports(one("Deployment", "shoprec-api"))["http"] == int(
        settings["SHOPREC_API_PORT"]
    )
    triton_service = one("Service", "triton")
    grpc = [p["port"] for p in triton_service["spec"]["ports"] if p["name"] == "grpc"]
    host = f"{triton_service['metadata']['name']}.{triton_service['metadata']['namespace']}."
    assert settings["SHOPREC_TRITON_URL"] == f"{host}svc.cluster.local:{grpc[0]}"


# --- pods: hardened and bounded -------------------------------------------------------------


def test_pods_meet_the_restricted_pod_security_standard_and_are_bounded() -> None:
    errors = []
    for obj in workloads(None):
        for pod in pod_specs(obj):
            ctx = pod.get("securityContext", {})
            if ctx.get("runAsNonRoot") is not True or ctx.get("runAsUser", 1) == 0:
                errors.append(f"{name_of(obj)}: not runAsNonRoot")
            if dig(ctx, "seccompProfile", "type") != "RuntimeDefault":
                errors.append(f"{name_of(obj)}: no RuntimeDefault seccomp profile")
            if pod.get("automountServiceAccountToken") is not False:
                errors.append(f"{name_of(obj)}: mounts a service-account token")
            if pod.get("hostNetwork") or pod.get("hostPID") or pod.get("hostIPC"):
                errors.append(f"{name_of(obj)}: shares a host namespace")
            for c in containers(pod):
                where = f"{name_of(obj)}/{c['name']}"
                sc = c.get("securityContext", {})
                if sc.get("allowPrivilegeEscalation") is not False:
                    errors.append(f"{where}: allowPrivilegeEscalation is not false")
                if "ALL" not in (dig(sc, "capabilities", "drop") or []):
                    errors.append(f"{where}: capabilities not dropped")
                if sc.get("readOnlyRootFilesystem") is not True:
                    errors.append(f"{where}: root filesystem writable")
                if sc.get("privileged") or sc.get("runAsUser") == 0:
                    errors.append(f"{where}: privileged or root")
                requests = dig(c, "resources", "requests") or {}
                limits = dig(c, "resources", "limits") or {}
                if not {"cpu", "memory"} <= set(requests) or "memory" not in limits:
                    errors.append(f"{where}: needs cpu and memory requests and a memory limit")
                name, suffix = _split_image(c["image"])
                if not suffix or suffix == ":latest" or "/" not in name:
                    errors.append(f"{where}: image {c['image']} is not a pinned registry image")
    assert errors == [], "\n".join(errors)


def test_triton_runs_on_gpu_nodes_with_explicit_model_control() -> None:
    triton = one("Deployment", "triton")
    (pod,) = pod_specs(triton)
    (server,) = pod["containers"]
    args = server["args"]
    assert "--model-control-mode=explicit" in args
    repo = next(a.split("=", 1)[1] for a in args if a.startswith("--model-repository="))
    assert server["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert server["resources"]["requests"]["nvidia.com/gpu"] == "1"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
        "tolerations"
    ]
    assert container_ports(triton) == {"http": 8000, "grpc": 8001, "metrics": 8002}
    # The same claim: read-only at Triton's --model-repository, writable for the learner.
    (mount,) = [m for m in server["volumeMounts"] if m["mountPath"] == repo]
    assert mount.get("readOnly") is True
    claims = {v["name"]: dig(v, "persistentVolumeClaim", "claimName") for v in pod["volumes"]}
    (learner_pod,) = pod_specs(one("Deployment", "shoprec-learner"))
    (learner,) = learner_pod["containers"]
    learner_claims = {
        v["name"]: dig(v, "persistentVolumeClaim", "claimName") for v in learner_pod["volumes"]
    }
    model_repo = configmap_data()["SHOPREC_MODEL_REPO"]
    (rw,) = [m for m in learner["volumeMounts"] if m["mountPath"] == model_repo]
    assert not rw.get("readOnly") and learner_claims[rw["name"]] == claims[mount["name"]]
    assert one("Deployment", "shoprec-learner")["spec"]["replicas"] == 1
    assert one("Deployment", "shoprec-learner")["spec"]["strategy"]["type"] == "Recreate"
    # The image is built FROM NVIDIA's release that the kustomization's tag names.
    dockerfile = TRITON_DOCKERFILE.read_text(encoding="utf-8")
    version = re.search(r"^ARG TRITON_VERSION=(\S+)$", dockerfile, re.M)
    assert version is not None
    assert "FROM nvcr.io/nvidia/tritonserver:${TRITON_VERSION}-py3" in dockerfile
    assert server["image"].endswith(f"-{version.group(1)}")


# --- settings --------------------------------------------------------------------------------

SETTING_NAMES = frozenset(ENV_PREFIX + name.upper() for name in Settings.model_fields)


def shoprec_env_of_objects() -> dict[str, dict[str, str]]:
    """SHOPREC_* variables per place they are set in the Kubernetes manifests."""
    found: dict[str, dict[str, str]] = {}
    for cm in objects_of("ConfigMap"):
        found[name_of(cm)] = dict(cm.get("data", {}))
    for s in objects_of("Secret"):
        found[name_of(s)] = {k: str(v) for k, v in s.get("stringData", {}).items()}
    for obj in workloads(None):
        for pod in pod_specs(obj):
            for c in containers(pod):
                found[f"{name_of(obj)}/{c['name']}"] = {
                    e["name"]: str(e.get("value", "")) for e in c.get("env", [])
                }
    for auth in objects_of("TriggerAuthentication"):
        found[name_of(auth)] = {e["name"]: "" for e in auth["spec"].get("env", [])}
    return {
        where: {k: v for k, v in env.items() if k.startswith(ENV_PREFIX)}
        for where, env in found.items()
    }


def check_settings(where: str, env: dict[str, str]) -> list[str]:
    """Unknown SHOPREC_* names, and values that Settings would reject."""
    errors = [
        f"{where}: {name} is not a setting (shoprec config lists them; or add it to "
        "NOT_YET_SETTINGS if its issue adds it)"
        for name in sorted(env)
        if name not in SETTING_NAMES | NOT_YET_SETTINGS
    ]
    values = {
        name[len(ENV_PREFIX) :].lower(): value
        for name, value in env.items()
        if name in SETTING_NAMES and value
    }
    try:
        Settings.model_validate(values)
    except ValidationError as exc:
        errors.append(f"{where}: {exc}")
    return errors


def test_every_shoprec_variable_is_a_setting_with_a_valid_value() -> None:
    places = shoprec_env_of_objects() | {
        f"{path.name}:{service}": env for path, service, env in compose_environments()
    }
    errors = [e for where, env in places.items() for e in check_settings(where, env)]
    assert errors == [], "\n".join(errors)
    everything = {name for env in places.values() for name in env}
    assert {"SHOPREC_REDIS_URL", "SHOPREC_KAFKA_SASL_PASSWORD"} <= everything
    # Secrets in the Secret only: never in the ConfigMap.
    assert not {"SHOPREC_REDIS_URL", "SHOPREC_KAFKA_SASL_PASSWORD", "SHOPREC_API_KEY"} & set(
        configmap_data()
    )


def test_not_yet_settings_are_not_settings_yet() -> None:
    landed = NOT_YET_SETTINGS & SETTING_NAMES
    assert not landed, f"{sorted(landed)} are settings now: remove them from NOT_YET_SETTINGS"


# --- Kafka topics (Strimzi) --------------------------------------------------------------


def test_kafka_topics_are_the_codes_topics_replicated_three_times() -> None:
    topics = {
        t["spec"].get("topicName", t["metadata"]["name"]): t for t in objects_of("KafkaTopic")
    }
    assert set(topics) == ALL_TOPICS
    settings = configmap_data()
    clusters = {o["metadata"]["labels"]["strimzi.io/cluster"] for o in objects_of("KafkaTopic")}
    clusters |= {o["metadata"]["labels"]["strimzi.io/cluster"] for o in objects_of("KafkaUser")}
    (cluster,) = clusters
    # Strimzi names the bootstrap Service <cluster>-kafka-bootstrap.
    assert settings["SHOPREC_KAFKA_BOOTSTRAP"].startswith(f"{cluster}-kafka-bootstrap.")
    for name, topic in topics.items():
        assert topic["spec"]["replicas"] == 3, f"{name}: replication factor must be 3"
        min_isr = str(topic["spec"]["config"]["min.insync.replicas"])
        assert min_isr == "2", f"{name}: min.insync.replicas must be 2"
        policy = topic["spec"]["config"].get("cleanup.policy", "delete")
        assert ("compact" in policy) == (name in {CATALOG, RECS_OUT}), name
    assert topics[CATALOG]["spec"]["config"]["cleanup.policy"] == "compact"
    # One partition count for the input topics: the workers' ceiling.
    (partitions,) = {topics[t]["spec"]["partitions"] for t in INPUT_TOPICS}
    assert partitions == int(settings["SHOPREC_TOPIC_PARTITIONS"])
    (scaled,) = objects_of("ScaledObject")
    assert scaled["spec"]["maxReplicaCount"] == partitions
    assert settings["SHOPREC_KAFKA_REPLICATION_FACTOR"] == "3"
    (user,) = objects_of("KafkaUser")
    assert user["metadata"]["name"] == settings["SHOPREC_KAFKA_SASL_USERNAME"]
    assert (
        user["spec"]["authentication"]["type"] == settings["SHOPREC_KAFKA_SASL_MECHANISM"].lower()
    )


# --- compose ---------------------------------------------------------------------------------

COMPOSE_TOP = frozenset({"name", "services", "volumes", "networks", "secrets", "configs"})
COMPOSE_SERVICE_KEYS = _words(
    "image build command entrypoint environment env_file volumes ports depends_on "
    "healthcheck restart shm_size deploy read_only tmpfs working_dir cap_drop "
    "security_opt stop_grace_period user profiles networks"
)
_INTERPOLATION = re.compile(
    r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}"
)


def interpolate(value: str) -> str:
    """Compose's ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, with VAR unset."""
    out = _INTERPOLATION.sub(lambda m: m["arg"] if m["op"] in (":-", "-") else "", value)
    assert "${" not in out, f"interpolation not understood in {value!r}"
    return out.replace("$$", "$")


def load_compose(path: Path) -> Manifest:
    (doc,) = load_documents(path)
    return doc


def compose_environments() -> Iterator[tuple[Path, str, dict[str, str]]]:
    for path in COMPOSE_FILES:
        for service, spec in load_compose(path)["services"].items():
            env = spec.get("environment", {})
            assert isinstance(env, dict), f"{path.name}:{service}: environment as a mapping"
            yield (
                path,
                service,
                {k: interpolate(str(v)) for k, v in env.items() if k.startswith(ENV_PREFIX)},
            )


def test_compose_file_is_consistent() -> None:
    compose = load_compose(DEPLOY / "compose.yaml")
    assert {k for k in compose if not k.startswith("x-")} <= COMPOSE_TOP
    services: dict[str, Manifest] = compose["services"]
    assert {"kafka", "redis", "triton", "worker", "api"} <= set(services)
    declared_volumes = set(compose.get("volumes") or {})
    host_ports: list[str] = []
    errors = []
    for name, spec in services.items():
        unknown = set(spec) - COMPOSE_SERVICE_KEYS
        if unknown:
            errors.append(f"{name}: unknown keys {sorted(unknown)}")
        if "image" not in spec and "build" not in spec:
            errors.append(f"{name}: neither image nor build")
        if "build" in spec:
            context = (DEPLOY / spec["build"]["context"]).resolve()
            if not (context / spec["build"]["dockerfile"]).is_file():
                errors.append(f"{name}: no Dockerfile {spec['build']['dockerfile']}")
        for dep, cond in (spec.get("depends_on") or {}).items():
            if dep not in services:
                errors.append(f"{name}: depends on unknown service {dep}")
            elif cond.get("condition") == "service_healthy" and "healthcheck" not in services[dep]:
                errors.append(f"{name}: waits for {dep} to be healthy, which has no healthcheck")
        for volume in spec.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith((".", "/")):
                if not (DEPLOY / source).exists():
                    errors.append(f"{name}: bind mount {source} does not exist")
            elif source not in declared_volumes:
                errors.append(f"{name}: volume {source} not declared")
        for port in spec.get("ports", []):
            host_ports.append(port.rsplit(":", 1)[0])
    assert errors == [], "\n".join(errors)
    assert len(host_ports) == len(set(host_ports)), f"a host port is published twice: {host_ports}"
    assert "ports" not in services["worker"], "workers scale with --scale: no fixed host port"
    override = load_compose(DEPLOY / "compose.gpu.yaml")
    assert set(override["services"]) <= set(services)


# --- the renderer is kustomize's ------------------------------------------------------------


def _by_identity(objects: list[Manifest]) -> dict[tuple[str, str, str, str], Manifest]:
    return {
        (o["apiVersion"], o["kind"], o["metadata"].get("namespace", ""), o["metadata"]["name"]): o
        for o in objects
    }


@pytest.mark.skipif(
    shutil.which("kubectl") is None,
    reason="kubectl is not installed: render() not compared with kustomize itself",
)
def test_render_agrees_with_kubectl_kustomize() -> None:
    kubectl = shutil.which("kubectl")
    assert kubectl is not None
    out = subprocess.run(
        [kubectl, "kustomize", str(K8S)], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    theirs = _by_identity([d for d in yaml.safe_load_all(out) if d is not None])
    ours = _by_identity(RENDERED)
    assert set(theirs) == set(ours)
    for key, obj in ours.items():
        assert theirs[key] == obj, key
