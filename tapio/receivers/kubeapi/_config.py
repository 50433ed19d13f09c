"""The kubeapi receiver's configuration.

Invariants:
- The API settings are the k8sattributes processor's (`tapio.k8s.APIConfig`):
  the same values reach the same server the same way, which is what lets
  both share one watch.
- `validate` reports every problem with its dotted key.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from tapio.component import setting
from tapio.k8s import APIConfig

Resource = Literal["pods", "nodes", "events", "namespaces", "replicasets", "deployments", "statefulsets", "daemonsets", "jobs", "cronjobs"]


@dataclass(frozen=True, kw_only=True)
class ObjectConfig:
    name: Resource = setting("pods", doc="The resource to watch: pods, nodes, events, namespaces, replicasets, deployments, statefulsets, daemonsets, jobs or cronjobs.")
    namespaces: list[str] = setting(default_factory=list, doc="Watch only these namespaces (one watch each). Empty: all namespaces.")
    label_selector: str = setting("", doc="A label selector, as kubectl -l takes it (app=web,tier!=db). Empty: every object.")
    field_selector: str = setting("", doc="A field selector (status.phase=Running, involvedObject.kind=Pod). Empty: every object.")


@dataclass(frozen=True, kw_only=True)
class NodeFilter:
    node: str = setting(
        "",
        doc="Keep only what concerns this node: its pods (spec.nodeName, on the server), itself (nodes), and events about "
        "it or its pods (kept on the client: events have no node field). Workload kinds are not filtered.",
    )
    node_from_env_var: str = setting("", doc="An environment variable holding the node name (downward API spec.nodeName); overrides node. Read at start.")


def _default_objects() -> list[ObjectConfig]:
    return [ObjectConfig(name="pods"), ObjectConfig(name="nodes"), ObjectConfig(name="events")]


@dataclass(frozen=True, kw_only=True)
class Config(APIConfig):
    objects: list[ObjectConfig] = setting(default_factory=_default_objects, doc="What to watch. Default: pods, nodes and events.")
    filter: NodeFilter = setting(default_factory=NodeFilter, doc="Scope a per-node agent to its node.")
    initial_state: bool = setting(
        False,
        doc="Also emit a record for every object found by the first list (false: changes from the start on only, as the Collector's "
        "k8sobjects watch mode). Events older than the start are never emitted.",
    )
    include_object: bool = setting(
        True, doc="Put the object as JSON (managedFields left out) in the body of pod, node and workload records. Events' bodies are their message."
    )

    def validate(self) -> list[str]:
        problems = self.api_problems()
        seen = set()
        for i, obj in enumerate(self.objects):
            for ns in obj.namespaces:
                key = (obj.name, ns, obj.label_selector, obj.field_selector)
                if key in seen:
                    problems.append(f"objects[{i}]: {obj.name} in namespace {ns or '(all)'} with the same selectors is listed twice")
                seen.add(key)
                if not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", ns):
                    problems.append(f"objects[{i}].namespaces: {ns!r} is not a namespace name")
            if not obj.namespaces:
                key = (obj.name, "", obj.label_selector, obj.field_selector)
                if key in seen:
                    problems.append(f"objects[{i}]: {obj.name} with the same selectors is listed twice")
                seen.add(key)
            if obj.name in ("nodes", "namespaces") and obj.namespaces:
                problems.append(f"objects[{i}].namespaces: {obj.name} are not namespaced")
            for key in ("label_selector", "field_selector"):
                value = getattr(obj, key)
                if value and (value.strip() != value or ",," in value or value.endswith(",")):
                    problems.append(f"objects[{i}].{key}: {value!r} is not a selector (comma-separated requirements, no spaces around)")
        if not self.objects:
            problems.append("objects: name at least one resource to watch")
        env = self.filter.node_from_env_var
        if env and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", env):
            problems.append(f"filter.node_from_env_var: {env!r} is not an environment variable name")
        return problems
