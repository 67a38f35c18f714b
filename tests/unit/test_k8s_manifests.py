"""deploy/k8s/: every overlay rendered, validated offline against the
Kubernetes schemas, and checked against what the code accepts.

kustomize is not a dependency: :class:`Kustomize` below renders the subset of
it the manifests use (deploy/README.md, "Kubernetes", lists it) and raises
on anything else, so a manifest that needs more fails here instead of being
rendered wrongly. Where ``kubectl`` is installed, its built-in kustomize
renders every overlay too and the two outputs must be equal.

The schemas are the ones ``kubernetes-validate`` bundles (strict: unknown
fields fail), for :data:`K8S_VERSIONS`; validation runs with sockets
refused, so it cannot have fetched anything.

The semantic checks are functions that return what is wrong; each is run on
the rendered overlays (nothing may be wrong) and on a broken copy (it must
say so), so none of them passes by finding nothing to check.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from blocks.hashing import DEFAULT_BLOCK_SIZE
from kvmesh.cli import build_parser
from kvmesh.cli import router as router_cli
from kvmesh.cli import sim_engine as sim_cli
from router.config import RouterConfig
from router.engine_registry import EngineSpec

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ("overlays/dev", "overlays/production")
# The oldest Kubernetes the manifests are written for, and the newest schema bundled.
K8S_VERSIONS = ("1.30", "1.37")
# Objects the production overlay uses and the operator creates (deploy/README.md says how).
EXTERNAL = {
    ("Secret", "kvmesh-tls"),
    ("Secret", "kvmesh-tokens"),
    ("Secret", "kvmesh-mesh-tls"),
    ("Secret", "kvmesh-mesh-secret"),
    ("PersistentVolumeClaim", "kvmesh-models"),
}
# What the kubelet puts in fieldRef env variables, for expanding $(VAR) in args.
FIELD_REFS = {"metadata.name": "kvmesh-router-5d8f7c9b4-x2x7q", "status.podIP": "10.1.2.3"}
# vLLM's KVEventsConfig fields (vllm/config/kv_events.py); SGLang's model is the same without the switch.
VLLM_KV_EVENTS_FIELDS = {
    "enable_kv_cache_events",
    "publisher",
    "endpoint",
    "replay_endpoint",
    "buffer_steps",
    "hwm",
    "max_queue_size",
    "topic",
}
SGLANG_KV_EVENTS_FIELDS = VLLM_KV_EVENTS_FIELDS - {"enable_kv_cache_events"}

# --------------------------------------------------------------------------------------------
# The kustomize subset
# --------------------------------------------------------------------------------------------

_KUSTOMIZATION_KEYS = {
    "apiVersion",
    "kind",
    "resources",
    "components",
    "namespace",
    "configMapGenerator",
    "patches",
    "images",
}
_CM_GENERATOR_KEYS = {"name", "behavior", "literals"}
_PATCH_KEYS = {"path", "patch", "target"}
_TARGET_KEYS = {"kind", "name", "group", "version"}
_IMAGE_KEYS = {"name", "newName", "newTag"}
# Strategic merge: the lists merged element by element, by this key (the
# Kubernetes API's patchMergeKey); every other list is replaced.
_MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "env": "name",
}
_CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume", "StorageClass"}
_POD_OWNERS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "ReplicaSet"}


class Unsupported(Exception):
    """A kustomize feature outside the subset (the manifests must not use it)."""


@dataclass
class _Res:
    obj: dict[str, Any]
    generated: bool = False  # a configMapGenerator's: gets the content hash at the end


class Kustomize:
    """Renders a kustomization directory: resources (files and directories),
    components, namespace, configMapGenerator (literals; create/merge/replace),
    patches (strategic merge, or JSON 6902 with a target), images."""

    def build(self, root: Path) -> list[dict[str, Any]]:
        out = self._build(root.resolve(), None)
        self._hash_generated(out)
        return [r.obj for r in out]

    def _build(self, root: Path, parent: list[_Res] | None) -> list[_Res]:
        k = yaml.safe_load((root / "kustomization.yaml").read_text())
        unknown = set(k) - _KUSTOMIZATION_KEYS
        if unknown:
            raise Unsupported(f"{root}: kustomization keys {sorted(unknown)}")
        is_component = k.get("kind") == "Component"
        if is_component != (parent is not None):
            raise Unsupported(f"{root}: a Component only as a component, a Kustomization only as a resource")
        res: list[_Res] = parent if parent is not None else []
        for entry in k.get("resources", []) + k.get("components", []):
            if Path(entry).is_absolute():
                raise Unsupported(f"{root}: {entry}: kustomize takes relative paths only")
        for entry in k.get("resources", []):
            path = (root / entry).resolve()
            if path.is_dir():
                res.extend(self._build(path, None))
            else:
                res.extend(_Res(doc) for doc in yaml.safe_load_all(path.read_text()) if doc)
        for entry in k.get("components", []):
            res = self._build((root / entry).resolve(), res)
        for gen in k.get("configMapGenerator", []):
            self._generate(res, gen)
        for patch in k.get("patches", []):
            self._patch(root, res, patch)
        if "namespace" in k:
            for r in res:
                if r.obj["kind"] not in _CLUSTER_SCOPED:
                    r.obj["metadata"]["namespace"] = k["namespace"]
        for image in k.get("images", []):
            self._image(res, image)
        return res

    @staticmethod
    def _generate(res: list[_Res], gen: dict[str, Any]) -> None:
        if set(gen) - _CM_GENERATOR_KEYS:
            raise Unsupported(f"configMapGenerator keys {sorted(set(gen) - _CM_GENERATOR_KEYS)}")
        data = {}
        for lit in gen.get("literals", []):
            key, sep, value = lit.partition("=")
            if not sep:
                raise Unsupported(f"literal {lit!r}")
            data[key] = value
        behavior = gen.get("behavior", "create")
        found = [r for r in res if r.generated and r.obj["metadata"]["name"] == gen["name"]]
        if behavior == "create":
            if found:
                raise Unsupported(f"configMapGenerator {gen['name']} created twice")
            cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": gen["name"]}, "data": data}
            res.append(_Res(cm, generated=True))
        elif behavior in ("merge", "replace") and len(found) == 1:
            old = found[0].obj.setdefault("data", {})
            found[0].obj["data"] = {**old, **data} if behavior == "merge" else data
        else:
            raise Unsupported(f"configMapGenerator {gen['name']}: behavior {behavior} on {len(found)} maps")

    def _patch(self, root: Path, res: list[_Res], spec: dict[str, Any]) -> None:
        if set(spec) - _PATCH_KEYS or ("path" in spec) == ("patch" in spec):
            raise Unsupported(f"patch {spec}")
        text = (root / spec["path"]).read_text() if "path" in spec else spec["patch"]
        body = yaml.safe_load(text)
        target = spec.get("target")
        if isinstance(body, list):
            if target is None:
                raise Unsupported("a JSON 6902 patch needs a target")
            hits = [r for r in res if _selected(r.obj, target)]
            for r in hits:
                for op in body:
                    _json6902(r.obj, op)
        else:
            if target is not None:
                raise Unsupported("strategic merge patches are matched by their own kind and name")
            hits = [
                r
                for r in res
                if r.obj["kind"] == body["kind"] and r.obj["metadata"]["name"] == body["metadata"]["name"]
            ]
            for r in hits:
                r.obj = _smp(r.obj, body, r.obj["kind"])
        if not hits:
            raise Unsupported(f"patch {spec} matches nothing")

    @staticmethod
    def _image(res: list[_Res], image: dict[str, Any]) -> None:
        if set(image) - _IMAGE_KEYS:
            raise Unsupported(f"images keys {sorted(set(image) - _IMAGE_KEYS)}")
        for r in res:
            for c in _containers(r.obj):
                name, tag = _split_image(c["image"])
                if name == image["name"]:
                    name = image.get("newName", name)
                    tag = image.get("newTag", tag)
                    c["image"] = f"{name}:{tag}" if tag else name

    @staticmethod
    def _hash_generated(res: list[_Res]) -> None:
        renames = {}
        for r in res:
            if r.generated:
                old = r.obj["metadata"]["name"]
                r.obj["metadata"]["name"] = f"{old}-{_configmap_hash(r.obj)}"
                renames[old] = r.obj["metadata"]["name"]
        for r in res:
            for ref in _configmap_refs(r.obj):
                if ref["name"] in renames:
                    ref["name"] = renames[ref["name"]]


def _selected(obj: dict[str, Any], target: dict[str, Any]) -> bool:
    if set(target) - _TARGET_KEYS:
        raise Unsupported(f"target keys {sorted(set(target) - _TARGET_KEYS)}")
    group, _, version = obj["apiVersion"].rpartition("/")
    return (
        target.get("kind", obj["kind"]) == obj["kind"]
        and target.get("name", obj["metadata"]["name"]) == obj["metadata"]["name"]
        and target.get("group", group) == group
        and target.get("version", version) == version
    )


def _smp(base: Any, patch: Any, kind: str, path: tuple[str, ...] = ()) -> Any:
    """A strategic merge: maps merge (a null deletes), lists with a merge key
    merge by it (the patch's elements first, then the base's others, as
    kustomize orders them), other lists and scalars are replaced."""
    if isinstance(patch, dict):
        if any(k.startswith("$") for k in patch):
            raise Unsupported(f"patch directive at {'/'.join(path)}")
        out = dict(base) if isinstance(base, dict) else {}
        for key, value in patch.items():
            if value is None:
                out.pop(key, None)
            else:
                out[key] = _smp(out.get(key), value, kind, (*path, key))
        return out
    if isinstance(patch, list) and patch and isinstance(patch[0], dict):
        key = _merge_key(kind, path)
        if key is None:
            raise Unsupported(f"strategic merge of the list {'/'.join(path)}")
        old = {item[key]: item for item in (base or [])}
        merged = [_smp(old.get(item[key]), item, kind, (*path, str(item[key]))) for item in patch]
        given = {item[key] for item in patch}
        return merged + [item for item in (base or []) if item[key] not in given]
    return copy.deepcopy(patch)


def _merge_key(kind: str, path: tuple[str, ...]) -> str | None:
    name = path[-1]
    if name == "ports":
        return "port" if kind == "Service" and path == ("spec", "ports") else "containerPort"
    return _MERGE_KEYS.get(name)


def _json6902(obj: dict[str, Any], op: dict[str, Any]) -> None:
    *parents, last = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
    node: Any = obj
    for p in parents:
        node = node[int(p)] if isinstance(node, list) else node[p]
    kind = op["op"]
    if isinstance(node, list):
        index = len(node) if last == "-" else int(last)
        if kind == "add":
            node.insert(index, copy.deepcopy(op["value"]))
        elif kind == "replace":
            node[index] = copy.deepcopy(op["value"])
        elif kind == "remove":
            del node[index]
        else:
            raise Unsupported(f"JSON patch op {kind}")
    elif kind in ("add", "replace"):
        if kind == "replace" and last not in node:
            raise Unsupported(f"replace of a missing {op['path']}")
        node[last] = copy.deepcopy(op["value"])
    elif kind == "remove":
        del node[last]
    else:
        raise Unsupported(f"JSON patch op {kind}")


def _split_image(image: str) -> tuple[str, str]:
    if "@" in image:
        raise Unsupported(f"image digest {image}")
    name, sep, tag = image.rpartition(":")
    if not sep or "/" in tag:
        return image, ""
    return name, tag


def _configmap_hash(cm: dict[str, Any]) -> str:
    """kustomize's name suffix (api/hasher): sha256 of kind, name and data as
    Go's json.Marshal writes them (keys sorted, HTML characters escaped), 10
    hex digits, a few of them swapped for letters. Its name is always ""
    (it looks the name up as one field called "metadata/name")."""
    body = {"kind": "ConfigMap", "name": "", "data": cm.get("data", {})}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    for ch, esc in (("&", "\\u0026"), ("<", "\\u003c"), (">", "\\u003e")):
        text = text.replace(ch, esc)
    digest = hashlib.sha256(text.encode()).hexdigest()[:10]
    return digest.translate(str.maketrans("013ae", "ghkmt"))


def _pod_spec(obj: dict[str, Any]) -> dict[str, Any] | None:
    if obj["kind"] in _POD_OWNERS:
        spec: dict[str, Any] = obj["spec"]["template"]["spec"]
        return spec
    return None


def _containers(obj: dict[str, Any]) -> Iterator[dict[str, Any]]:
    spec = _pod_spec(obj)
    if spec is not None:
        yield from spec.get("initContainers", [])
        yield from spec.get("containers", [])


def _configmap_refs(obj: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every place a pod names a ConfigMap (the dicts holding the name)."""
    spec = _pod_spec(obj)
    if spec is None:
        return
    for v in spec.get("volumes", []):
        if "configMap" in v:
            yield v["configMap"]
    for c in _containers(obj):
        for e in c.get("envFrom", []):
            if "configMapRef" in e:
                yield e["configMapRef"]
        for e in c.get("env", []):
            ref = e.get("valueFrom", {}).get("configMapKeyRef")
            if ref is not None:
                yield ref


def render(path: Path) -> list[dict[str, Any]]:
    return Kustomize().build(path)


# --------------------------------------------------------------------------------------------
# What the rendered objects say
# --------------------------------------------------------------------------------------------


def _find(objs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    hits = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(hits) == 1, f"{kind}/{name}: {len(hits)} found"
    return hits[0]


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def _container_env(objs: list[dict[str, Any]], c: dict[str, Any]) -> dict[str, str]:
    """The container's environment as the kubelet builds it (envFrom, then env)."""
    cms = {o["metadata"]["name"]: o.get("data", {}) for o in objs if o["kind"] == "ConfigMap"}
    env: dict[str, str] = {}
    for src in c.get("envFrom", []):
        env.update(cms[src["configMapRef"]["name"]])
    for e in c.get("env", []):
        if "value" in e:
            env[e["name"]] = _expand(e["value"], env)
        elif "fieldRef" in e.get("valueFrom", {}):
            env[e["name"]] = FIELD_REFS[e["valueFrom"]["fieldRef"]["fieldPath"]]
        elif "configMapKeyRef" in e.get("valueFrom", {}):
            ref = e["valueFrom"]["configMapKeyRef"]
            env[e["name"]] = cms[ref["name"]][ref["key"]]
    return env


_VAR = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def _expand(text: str, env: dict[str, str]) -> str:
    """The kubelet's $(VAR) expansion (an unknown variable stays as written)."""
    return _VAR.sub(lambda m: env.get(m.group(1), m.group(0)), text)


def _args(objs: list[dict[str, Any]], c: dict[str, Any]) -> list[str]:
    env = _container_env(objs, c)
    return [_expand(a, env) for a in c.get("args", [])]


def _flag(args: list[str], name: str) -> list[str]:
    """Values of ``--name=VALUE`` (the manifests' one spelling)."""
    return [a.partition("=")[2] for a in args if a.partition("=")[0] == name]


def _port_of(hostport: str) -> int:
    return int(hostport.rpartition(":")[2])


def _named_ports(c: dict[str, Any]) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in c.get("ports", []) if "name" in p}


def _resolve_port(c: dict[str, Any], port: int | str) -> int | None:
    if isinstance(port, int):
        return port if port in {p["containerPort"] for p in c.get("ports", [])} else None
    return _named_ports(c).get(port)


@dataclass
class Router:
    """The router Deployment of a render, and what its command line says."""

    deployment: dict[str, Any]
    container: dict[str, Any]
    argv: list[str]
    env: dict[str, str]

    @property
    def pod_labels(self) -> dict[str, str]:
        labels: dict[str, str] = self.deployment["spec"]["template"]["metadata"]["labels"]
        return labels

    def config(self) -> RouterConfig:
        """The node's config, built by the CLI's own parser and checks."""
        return router_config(self.argv, self.env)


def router_config(argv: list[str], env: dict[str, str]) -> RouterConfig:
    """What `kvmesh router ARGV` would run with, in a container whose
    environment is ``env`` (flag defaults read $KVMESH_* at parser build)."""
    saved = dict(os.environ)
    os.environ.update({k: v for k, v in env.items() if k.startswith("KVMESH_")})
    try:
        return router_cli.config_from_args(build_parser("router").parse_args(argv))
    finally:
        os.environ.clear()
        os.environ.update(saved)


def routers(objs: list[dict[str, Any]]) -> list[Router]:
    out = []
    for o in objs:
        for c in _containers(o):
            if c.get("args", [None])[0] == "router":
                out.append(Router(o, c, _args(objs, c), _container_env(objs, c)))
    return out


def _option_strings(command: str) -> set[str]:
    parser = build_parser(command)
    sub = next(a for a in parser._actions if a.dest == "command")
    return {s for a in sub.choices[command]._actions for s in a.option_strings}


# --------------------------------------------------------------------------------------------
# The semantic checks: each returns what is wrong
# --------------------------------------------------------------------------------------------


def check_kvmesh_flags(objs: list[dict[str, Any]]) -> list[str]:
    """Every flag of a kvmesh container is one `kvmesh COMMAND --help` lists,
    no $(VAR) is left unexpanded, and the CLI builds a valid config of it."""
    problems = []
    for o in objs:
        for c in _containers(o):
            if not c["image"].rpartition("/")[2].startswith("kvmesh"):
                continue
            argv = _args(objs, c)
            command = argv[0]
            known = _option_strings(command)
            for a in argv[1:]:
                if a.startswith("-") and a.partition("=")[0] not in known:
                    problems.append(
                        f"{o['metadata']['name']}: `kvmesh {command}` has no {a.partition('=')[0]}"
                    )
                if _VAR.search(a):
                    problems.append(f"{o['metadata']['name']}: {a!r} names an undefined variable")
            if problems:
                continue
            try:
                if command == "router":
                    cfg = router_config(argv, _container_env(objs, c))
                    if cfg.unauthenticated_ports() and not cfg.insecure:
                        problems.append(f"{o['metadata']['name']}: would refuse to start without --insecure")
                    if cfg.api_auth.tls and not cfg.mesh_listen:
                        problems.append(f"{o['metadata']['name']}: the mesh cannot share a TLS public port")
                else:
                    sim_cli.config_from_args(build_parser(command).parse_args(argv))
            except (ValueError, SystemExit) as e:
                problems.append(f"{o['metadata']['name']}: `kvmesh {' '.join(argv)}` fails: {e}")
    return problems


def check_router_ports_and_probes(objs: list[dict[str, Any]]) -> list[str]:
    """Container ports are the ports the flags listen on; every probe asks a
    declared port, the gRPC one (plaintext: the kubelet's gRPC probe has no
    TLS) or the HTTP front's /health (HTTPS when the public port has TLS);
    the Prometheus annotations name the metrics port and its scheme."""
    problems = []
    for r in routers(objs):
        cfg = r.config()
        ports = _named_ports(r.container)
        want = {"grpc": _port_of(cfg.listen), "http": _port_of(cfg.http_listen)}
        if cfg.metrics_listen:
            want["metrics"] = _port_of(cfg.metrics_listen)
        if cfg.mesh_listen:
            want["mesh"] = _port_of(cfg.mesh_listen)
        for name, port in want.items():
            if ports.get(name) != port:
                problems.append(f"container port {name}={ports.get(name)}, but the node listens on {port}")
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = r.container.get(kind)
            if probe is None:
                problems.append(f"no {kind}")
                continue
            if "grpc" in probe:
                if _resolve_port(r.container, probe["grpc"]["port"]) != want["grpc"]:
                    problems.append(f"{kind}: gRPC port {probe['grpc']['port']} is not the node's gRPC port")
                if probe["grpc"].get("service", "") != "":
                    problems.append(f"{kind}: the node's overall health is service ''")
                if cfg.api_auth.tls:
                    problems.append(f"{kind}: the kubelet's gRPC probe cannot speak TLS")
            elif "httpGet" in probe:
                get = probe["httpGet"]
                if _resolve_port(r.container, get["port"]) != want["http"] or get["path"] != "/health":
                    problems.append(f"{kind}: not the HTTP front's /health")
                if (get.get("scheme", "HTTP") == "HTTPS") != cfg.api_auth.tls:
                    problems.append(f"{kind}: scheme {get.get('scheme', 'HTTP')} with tls={cfg.api_auth.tls}")
                if cfg.api_auth.tls_client_ca:
                    problems.append(f"{kind}: the kubelet has no client certificate")
            else:
                problems.append(f"{kind}: neither gRPC nor HTTP")
        notes = r.deployment["spec"]["template"]["metadata"].get("annotations", {})
        if notes.get("prometheus.io/scrape") != "true" or int(notes.get("prometheus.io/port", 0)) != want.get(
            "metrics"
        ):
            problems.append(f"Prometheus annotations {notes} do not name the metrics port")
        if (notes.get("prometheus.io/scheme", "http") == "https") != cfg.api_auth.tls:
            problems.append("prometheus.io/scheme does not match the metrics port's TLS")
    return problems


def check_drain(objs: list[dict[str, Any]]) -> list[str]:
    """preStop + the drain + leaving the mesh + cutting the streams left +
    stopping each server fit in the termination grace period
    (router/service.py, serve's finally)."""
    problems = []
    defaults = RouterConfig()
    for r in routers(objs):
        cfg = r.config()
        pre = r.container.get("lifecycle", {}).get("preStop", {})
        command = pre.get("exec", {}).get("command", [])
        if command[:1] != ["sleep"]:
            problems.append(f"preStop {pre} is not a sleep")
            continue
        servers = 1 + bool(cfg.http_listen) + bool(cfg.mesh_listen)
        stops = 1 + servers  # service.cut_streams, then each server
        need = float(command[1]) + cfg.drain_timeout + defaults.leave_timeout + stops * defaults.stop_grace
        grace = r.deployment["spec"]["template"]["spec"].get("terminationGracePeriodSeconds", 30)
        if need > grace:
            problems.append(
                f"preStop + drain + leave + cut + stop = {need} s > terminationGracePeriodSeconds {grace}"
            )
    return problems


def check_router_selection(objs: list[dict[str, Any]]) -> list[str]:
    """The join name is a headless Service that publishes not-ready pods and
    selects the routers on their mesh port; the client Service and the PDB
    select them too; the Deployment rolls without losing capacity."""
    problems = []
    for r in routers(objs):
        cfg = r.config()
        labels = r.pod_labels
        dep = r.deployment["spec"]
        if not _selects(dep["selector"]["matchLabels"], labels):
            problems.append("the Deployment's selector does not select its own pods")
        if dep["strategy"]["rollingUpdate"]["maxUnavailable"] != 0:
            problems.append("a rolling update may take a router away before its replacement is ready")
        mesh_port = _port_of(cfg.mesh_addr)
        for seed in cfg.join:
            host, port = seed.rpartition(":")[0], int(seed.rpartition(":")[2])
            svc = [o for o in objs if o["kind"] == "Service" and o["metadata"]["name"] == host.split(".")[0]]
            if not svc:
                problems.append(f"--join {seed}: no Service {host}")
                continue
            spec = svc[0]["spec"]
            if spec.get("clusterIP") != "None" or not spec.get("publishNotReadyAddresses"):
                problems.append(f"--join {seed}: Service must be headless and publish not-ready pods")
            if not _selects(spec.get("selector", {}), labels):
                problems.append(f"--join {seed}: Service does not select the router pods")
            if port != mesh_port or port not in {p["port"] for p in spec["ports"]}:
                problems.append(f"--join {seed}: not the mesh port {mesh_port} of the Service")
        clients = [
            o
            for o in objs
            if o["kind"] == "Service"
            and o["spec"].get("clusterIP") != "None"
            and _selects(o["spec"].get("selector", {}), labels)
        ]
        if len(clients) != 1:
            problems.append(f"{len(clients)} client Services select the routers")
        for svc in clients:
            for p in svc["spec"]["ports"]:
                if _resolve_port(r.container, p["targetPort"]) is None:
                    problems.append(f"client Service port {p['name']}: target {p['targetPort']} is no port")
            names = {p["name"] for p in svc["spec"]["ports"]}
            if not {"grpc", "http", "metrics"} <= names:
                problems.append(f"client Service ports {sorted(names)}: want grpc, http, metrics")
        pdbs = [
            o
            for o in objs
            if o["kind"] == "PodDisruptionBudget" and _selects(o["spec"]["selector"]["matchLabels"], labels)
        ]
        if len(pdbs) != 1:
            problems.append(f"{len(pdbs)} PodDisruptionBudgets select the routers")
    return problems


@dataclass
class Engine:
    """An engine Deployment: what it serves and where it publishes."""

    name: str
    kind: str  # "vllm" or "sglang" (the router's EngineSpec.kind); the sim engine is vLLM-like
    model: str
    block_size: int
    http_port: int
    kv_port: int
    replay_port: int
    topic: str
    problems: list[str]


def _engine(objs: list[dict[str, Any]], dep: dict[str, Any]) -> Engine | None:
    c = dep["spec"]["template"]["spec"]["containers"][0]
    command = c.get("command", []) + _args(objs, c)
    name = dep["metadata"]["name"]
    problems: list[str] = []
    if command[:1] == ["sim-engine"]:
        cfg = sim_cli.config_from_args(build_parser("sim-engine").parse_args(command))
        return Engine(
            name,
            "vllm",
            cfg.model,
            cfg.block_size,
            cfg.port,
            _port_of(cfg.kv_events_endpoint),
            _port_of(cfg.kv_replay_endpoint),
            cfg.kv_topic,
            problems,
        )
    if command[:2] == ["vllm", "serve"]:
        kind, size_flag, fields = "vllm", "--block-size", VLLM_KV_EVENTS_FIELDS
    elif command[:3] == ["python3", "-m", "sglang.launch_server"]:
        kind, size_flag, fields = "sglang", "--page-size", SGLANG_KV_EVENTS_FIELDS
    else:
        return None
    events = json.loads(_flag(command, "--kv-events-config")[0])
    if set(events) - fields:
        problems.append(f"{name}: --kv-events-config fields {sorted(set(events) - fields)} are not {kind}'s")
    if events.get("publisher") != "zmq" or (
        kind == "vllm" and events.get("enable_kv_cache_events") is not True
    ):
        problems.append(f"{name}: KV events not published over ZMQ")
    for key in ("endpoint", "replay_endpoint"):
        if not str(events.get(key, "")).startswith("tcp://*:"):
            problems.append(f"{name}: {key} must bind every interface (tcp://*:PORT)")
    sizes = _flag(command, size_flag)
    return Engine(
        name,
        kind,
        _flag(command, "--served-model-name")[0],
        int(sizes[0]) if sizes else -1,
        int(_flag(command, "--port")[0]),
        _port_of(events.get("endpoint", ":0")),
        _port_of(events.get("replay_endpoint", ":0")),
        events.get("topic", ""),
        problems,
    )


def check_engine_discovery(objs: list[dict[str, Any]]) -> list[str]:
    """Every --engines-from-dns name is a headless Service of engine pods; the
    spec the router makes of an address (its own template code) reaches the
    engine's HTTP, KV-event and replay ports, with the engine's model, kind,
    topic and block size, and that block size is the router's."""
    problems = []
    for r in routers(objs):
        cfg = r.config()
        if not cfg.discovery.names:
            problems.append("the routers discover no engines")
        for source in cfg.discovery.sources():
            spec: EngineSpec = source.spec_for("10.9.8.7")
            svc = [o for o in objs if o["kind"] == "Service" and o["metadata"]["name"] == source.name]
            if not svc:
                problems.append(f"--engines-from-dns {source.name}: no such Service")
                continue
            if svc[0]["spec"].get("clusterIP") != "None":
                problems.append(f"--engines-from-dns {source.name}: not a headless Service")
            pods = [
                o
                for o in objs
                if o["kind"] == "Deployment"
                and _selects(svc[0]["spec"]["selector"], o["spec"]["template"]["metadata"]["labels"])
            ]
            if len(pods) != 1:
                problems.append(f"--engines-from-dns {source.name}: selects {len(pods)} Deployments")
                continue
            engine = _engine(objs, pods[0])
            if engine is None:
                problems.append(f"{pods[0]['metadata']['name']}: not an engine this test knows")
                continue
            problems += engine.problems
            got = (
                spec.endpoint,
                spec.kv_events_endpoint,
                spec.replay_endpoint,
                spec.model,
                spec.kind,
                spec.topic,
                spec.block_size,
            )
            want = (
                f"http://10.9.8.7:{engine.http_port}",
                f"tcp://10.9.8.7:{engine.kv_port}",
                f"tcp://10.9.8.7:{engine.replay_port}",
                engine.model,
                engine.kind,
                engine.topic,
                engine.block_size,
            )
            if got != want:
                problems.append(
                    f"--engines-from-dns {source.name}: the router makes {got}, the engine is {want}"
                )
            if engine.block_size != DEFAULT_BLOCK_SIZE:
                problems.append(
                    f"{engine.name}: block size {engine.block_size}, the router's is {DEFAULT_BLOCK_SIZE}"
                )
            c = pods[0]["spec"]["template"]["spec"]["containers"][0]
            declared = {p["containerPort"] for p in c["ports"]}
            if not {engine.http_port, engine.kv_port, engine.replay_port} <= declared:
                problems.append(f"{engine.name}: ports {sorted(declared)} lack the HTTP, KV or replay port")
            if (
                cfg.tokenizers.get(engine.model, cfg.default_tokenizer) == "builtin"
                and engine.name != "sim-engine"
            ):
                problems.append(
                    f"{engine.name}: a real model needs --tokenizer {engine.model}=DIR on the routers"
                )
    return problems


def check_references(objs: list[dict[str, Any]], namespace: str) -> list[str]:
    """Everything a pod names exists (rendered, or created by the operator as
    deploy/README.md says); every file a router flag names is on a mounted
    volume; every namespaced object is in the overlay's namespace; every
    container has resources."""
    problems = []
    have = {(o["kind"], o["metadata"]["name"]) for o in objs}
    readme = (ROOT / "deploy" / "README.md").read_text()
    for kind, name in EXTERNAL:
        if f"`{name}`" not in readme:
            problems.append(f"deploy/README.md does not say how to create {kind} {name}")
    for o in objs:
        if o["kind"] not in _CLUSTER_SCOPED and o["metadata"].get("namespace") != namespace:
            problems.append(f"{o['kind']}/{o['metadata']['name']} is not in namespace {namespace}")
        spec = _pod_spec(o)
        if spec is None:
            continue
        for v in spec.get("volumes", []):
            ref = None
            if "secret" in v:
                ref = ("Secret", v["secret"]["secretName"])
            elif "persistentVolumeClaim" in v:
                ref = ("PersistentVolumeClaim", v["persistentVolumeClaim"]["claimName"])
            elif "configMap" in v:
                ref = ("ConfigMap", v["configMap"]["name"])
            if ref is not None and ref not in have and ref not in EXTERNAL:
                problems.append(
                    f"{o['metadata']['name']}: volume {v['name']} names {ref}, which nobody creates"
                )
        for c in _containers(o):
            for ref in c.get("envFrom", []):
                if ("ConfigMap", ref["configMapRef"]["name"]) not in have:
                    problems.append(
                        f"{c['name']}: envFrom ConfigMap {ref['configMapRef']['name']} is missing"
                    )
            res = c.get("resources", {})
            if not {"cpu", "memory"} <= set(res.get("requests", {})) or "memory" not in res.get("limits", {}):
                problems.append(f"{c['name']}: wants cpu and memory requests and a memory limit")
            volumes = {v["name"] for v in spec.get("volumes", [])}
            for m in c.get("volumeMounts", []):
                if m["name"] not in volumes:
                    problems.append(f"{c['name']}: mount {m['name']} has no volume")
    for r in routers(objs):
        cfg = r.config()
        mounts = [m["mountPath"].rstrip("/") + "/" for m in r.container.get("volumeMounts", [])]
        files = [
            cfg.api_auth.tls_cert,
            cfg.api_auth.tls_key,
            cfg.api_auth.tls_client_ca,
            cfg.api_auth.token_file,
            cfg.transport.secret_file,
            cfg.transport.tls_cert,
            cfg.transport.tls_key,
            cfg.transport.tls_ca,
            *(p for p in cfg.tokenizers.values() if p != "builtin"),
            *cfg.chat_templates.values(),
        ]
        for path in filter(None, files):
            if not any(path.startswith(m) for m in mounts):
                problems.append(f"router: {path} is on no mounted volume")
    return problems


SEMANTIC_CHECKS = (
    check_kvmesh_flags,
    check_router_ports_and_probes,
    check_drain,
    check_router_selection,
    check_engine_discovery,
)


# --------------------------------------------------------------------------------------------
# The tests
# --------------------------------------------------------------------------------------------


def _namespace(overlay: str) -> str:
    return str(yaml.safe_load((K8S / overlay / "kustomization.yaml").read_text())["namespace"])


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every overlay, and production with the optional SGLang component added
    the way deploy/README.md says (in a copy of the tree)."""
    out = {o: K8S / o for o in OVERLAYS}
    copy_root = tmp_path_factory.mktemp("k8s") / "k8s"
    shutil.copytree(K8S, copy_root)
    prod = copy_root / "overlays/production/kustomization.yaml"
    kustomization = yaml.safe_load(prod.read_text())
    kustomization["components"] = ["../../engines/sglang"]
    prod.write_text(yaml.safe_dump(kustomization))
    out["overlays/production+engines/sglang"] = prod.parent
    return out


@pytest.fixture(scope="module")
def rendered(sources: dict[str, Path]) -> dict[str, list[dict[str, Any]]]:
    return {name: render(path) for name, path in sources.items()}


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refused(*args: object, **kwargs: object) -> None:
        raise OSError("network refused by the test: schemas must be bundled")

    monkeypatch.setattr(socket.socket, "connect", refused)
    monkeypatch.setattr(socket, "create_connection", refused)
    monkeypatch.setattr(socket, "getaddrinfo", refused)


def test_every_object_is_valid_against_the_kubernetes_schemas(rendered, no_network, capsys) -> None:
    for name, objs in rendered.items():
        kinds: dict[str, int] = {}
        for obj in objs:
            for version in K8S_VERSIONS:
                try:
                    kubernetes_validate.validate(obj, version, strict=True)
                except kubernetes_validate.ValidationError as e:
                    pytest.fail(
                        f"{name}: {obj['kind']}/{obj['metadata']['name']} (Kubernetes {version}): {e}"
                    )
            kinds[obj["kind"]] = kinds.get(obj["kind"], 0) + 1
        with capsys.disabled():
            summary = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
            print(
                f"\n{name}: {len(objs)} objects valid for Kubernetes {' and '.join(K8S_VERSIONS)}: {summary}"
            )
    # Strict schemas: a misspelt field is an error, not silently dropped.
    typo = copy.deepcopy(_find(rendered["overlays/dev"], "Deployment", "kvmesh-router"))
    typo["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpcc"] = {"port": 50051}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(typo, K8S_VERSIONS[0], strict=True)


@pytest.mark.parametrize("check", SEMANTIC_CHECKS, ids=lambda c: c.__name__)
def test_semantic_check_passes_on_every_overlay(rendered, check) -> None:
    for name, objs in rendered.items():
        assert check(objs) == [], name


def test_references_resolve(rendered) -> None:
    for name, objs in rendered.items():
        namespace = _namespace(name.split("+")[0])
        assert check_references(objs, namespace) == [], name


def test_overlays_differ_where_they_should(rendered) -> None:
    dev = routers(rendered["overlays/dev"])[0].config()
    prod = routers(rendered["overlays/production"])[0].config()
    assert dev.insecure and not dev.api_auth.tls
    assert not prod.insecure and prod.unauthenticated_ports() == []
    assert (
        prod.api_auth.tls and prod.api_auth.token_file and prod.transport.tls and prod.transport.secret_file
    )
    # The mesh dials plaintext unless it has mutual TLS of its own: on a TLS public port it never joins.
    assert prod.mesh_listen and dev.mesh_listen
    sglang = routers(rendered["overlays/production+engines/sglang"])[0].config()
    assert [s.name for s in sglang.discovery.sources()] == ["vllm", "sglang"]


def _router_objs(rendered) -> list[dict[str, Any]]:
    return copy.deepcopy(rendered["overlays/production"])


def _router_container(objs: list[dict[str, Any]]) -> dict[str, Any]:
    c: dict[str, Any] = routers(objs)[0].container
    return c


def test_checks_catch_broken_manifests(rendered) -> None:
    """Each check, on a copy broken the way a careless edit would break it."""
    objs = _router_objs(rendered)
    _router_container(objs)["args"].append("--drain-timeot=30")
    assert any("has no --drain-timeot" in p for p in check_kvmesh_flags(objs))

    objs = _router_objs(rendered)
    _router_container(objs)["args"].append("--policy=$(KVMESH_POLICYY)")
    assert any("undefined variable" in p for p in check_kvmesh_flags(objs))

    objs = copy.deepcopy(rendered["overlays/dev"])
    c = _router_container(objs)
    c["args"].remove("--insecure")
    assert any("refuse to start" in p for p in check_kvmesh_flags(objs))

    objs = _router_objs(rendered)
    _router_container(objs)["ports"][1]["containerPort"] = 50052
    assert check_router_ports_and_probes(objs)

    objs = copy.deepcopy(rendered["overlays/dev"])
    _router_container(objs)["readinessProbe"]["grpc"]["port"] = 8080
    assert any("readinessProbe" in p for p in check_router_ports_and_probes(objs))

    objs = _router_objs(rendered)  # production, TLS: a gRPC probe would never succeed
    probe = _router_container(objs)["livenessProbe"]
    del probe["httpGet"]
    probe["grpc"] = {"port": 50051}
    assert any("cannot speak TLS" in p for p in check_router_ports_and_probes(objs))

    objs = _router_objs(rendered)
    routers(objs)[0].deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = 30
    assert any("terminationGracePeriodSeconds 30" in p for p in check_drain(objs))

    objs = _router_objs(rendered)
    _find(objs, "Service", "kvmesh-router-peers")["spec"]["publishNotReadyAddresses"] = False
    assert check_router_selection(objs)

    objs = _router_objs(rendered)
    _find(objs, "PodDisruptionBudget", "kvmesh-router")["spec"]["selector"]["matchLabels"] = {"app": "x"}
    assert any("PodDisruptionBudgets" in p for p in check_router_selection(objs))

    objs = _router_objs(rendered)
    _find(objs, "Service", "vllm")["metadata"]["name"] = "vllm-engines"
    assert any("no such Service" in p for p in check_engine_discovery(objs))

    objs = _router_objs(rendered)
    vllm = _find(objs, "Deployment", "vllm")["spec"]["template"]["spec"]["containers"][0]
    vllm["args"] = [a.replace("--block-size=16", "--block-size=32") for a in vllm["args"]]
    assert any("block size" in p or "the router makes" in p for p in check_engine_discovery(objs))

    objs = _router_objs(rendered)
    _find(objs, "Deployment", "vllm")["spec"]["template"]["spec"]["containers"][0]["args"] = [
        a.replace('"tcp://*:5558"', '"tcp://*:5559"')
        for a in _find(objs, "Deployment", "vllm")["spec"]["template"]["spec"]["containers"][0]["args"]
    ]
    assert any("the router makes" in p for p in check_engine_discovery(objs))

    objs = _router_objs(rendered)
    _router_container(objs)["volumeMounts"] = [
        m for m in _router_container(objs)["volumeMounts"] if m["name"] != "mesh-tls"
    ]
    assert any("mounted volume" in p for p in check_references(objs, "kvmesh"))


def test_renderer_raises_outside_its_subset(tmp_path) -> None:
    (tmp_path / "kustomization.yaml").write_text("resources: []\nnamePrefix: x-\n")
    with pytest.raises(Unsupported, match="namePrefix"):
        render(tmp_path)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (its built-in kustomize) not installed")
def test_renderer_matches_kubectl_kustomize(sources, rendered) -> None:
    for name, path in sources.items():
        out = subprocess.run(
            ["kubectl", "kustomize", str(path)], capture_output=True, text=True, timeout=60, check=True
        ).stdout

        def key(o: dict[str, Any]) -> tuple[str, str]:
            return o["kind"], o["metadata"]["name"]

        theirs = sorted((d for d in yaml.safe_load_all(out) if d), key=key)
        ours = sorted(rendered[name], key=key)
        assert [key(o) for o in ours] == [key(o) for o in theirs], name
        for a, b in zip(ours, theirs):
            assert a == b, f"{name}: {key(a)} differs from kubectl kustomize"
