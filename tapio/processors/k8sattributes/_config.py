"""The k8sattributes processor's configuration: the OpenTelemetry Collector's keys and defaults.

Invariants:
- Keys, values and defaults are the Collector's k8sattributesprocessor's
  where tapio has the feature (auth_type, passthrough, filter, extract,
  pod_association, exclude, wait_for_metadata); tapio's additions are
  ``pod_delete_grace_period`` and ``owner_lookup``; what the Collector has
  and tapio does not is rejected by name, never silently ignored.
- `validate` reports every problem with its dotted key; a regex that does
  not compile, a metadata name tapio cannot fill, an association with more
  than four sources are problems.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from tapio.component import setting
from tapio.k8s import APIConfig, FieldFilter, filter_problems
from tapio.units import Duration

#: the Collector's default extract.metadata
DEFAULT_METADATA = ["k8s.namespace.name", "k8s.pod.name", "k8s.pod.uid", "k8s.pod.start_time", "k8s.deployment.name", "k8s.node.name"]
#: pod-level attributes tapio can fill
POD_METADATA = {
    "k8s.namespace.name",
    "k8s.pod.name",
    "k8s.pod.uid",
    "k8s.pod.hostname",
    "k8s.pod.ip",
    "k8s.pod.start_time",
    "k8s.node.name",
    "k8s.replicaset.name",
    "k8s.replicaset.uid",
    "k8s.deployment.name",
    "k8s.deployment.uid",
    "k8s.statefulset.name",
    "k8s.statefulset.uid",
    "k8s.daemonset.name",
    "k8s.daemonset.uid",
    "k8s.job.name",
    "k8s.job.uid",
    "k8s.cronjob.name",
    "k8s.cronjob.uid",
    "k8s.node.uid",
    "k8s.cluster.uid",
}
#: container-level attributes (filled when the record names its container, by container.id)
CONTAINER_METADATA = {"k8s.container.name", "container.id", "container.image.name", "container.image.tag", "k8s.container.restart_count"}
#: attributes an association source may name
ASSOCIATION_ATTRIBUTES = {"k8s.pod.ip", "k8s.pod.uid", "container.id", "k8s.pod.name", "k8s.namespace.name"}
#: the Collector's default exclusions (its own agents)
DEFAULT_EXCLUDED_PODS = ["jaeger-agent", "jaeger-collector"]
MAX_SOURCES = 4


@dataclass(frozen=True, kw_only=True)
class FilterConfig:
    node: str = setting("", doc="Keep only pods on this node (a field selector on spec.nodeName). Empty: every node.")
    node_from_env_var: str = setting(
        "",
        doc="Name of an environment variable holding the node name to keep pods of (set it from the downward API: "
        "spec.nodeName). Read at start; an unset or empty variable is an error then. Overrides node.",
    )
    namespace: str = setting("", doc="Keep only pods in this namespace. Empty: every namespace.")
    fields: list[FieldFilter] = setting(default_factory=list, doc="Field selectors on pods (key, value, op: equals | not-equals), ANDed.")
    labels: list[FieldFilter] = setting(
        default_factory=list, doc="Label selectors on pods (key, value, op: equals | not-equals | exists | does-not-exist), ANDed."
    )


@dataclass(frozen=True, kw_only=True)
class ExtractRule:
    tag_name: str = setting(
        "",
        doc="The resource attribute to set. With key_regex it may use the regex's groups ($1). Empty: "
        "k8s.<from>.labels.<key> (k8s.<from>.annotations.<key> for annotations).",
    )
    key: str = setting("", doc="The label or annotation to copy. Exactly one of key and key_regex is set.")
    key_regex: str = setting("", doc="A regular expression matched against whole label or annotation keys; every match is copied.")
    from_: Literal["pod", "namespace", "node"] = setting("pod", key="from", doc="Which object's labels or annotations: pod, namespace or node.")


@dataclass(frozen=True, kw_only=True)
class ExtractConfig:
    metadata: list[str] = setting(
        default_factory=lambda: list(DEFAULT_METADATA),
        doc="Resource attributes to add (semantic-convention names). Container attributes (k8s.container.name, "
        "container.image.name, container.image.tag, container.id, k8s.container.restart_count) are added when the record names its container.",
    )
    labels: list[ExtractRule] = setting(default_factory=list, doc="Labels to copy into resource attributes (tag_name, key or key_regex, from).")
    annotations: list[ExtractRule] = setting(default_factory=list, doc="Annotations to copy into resource attributes (tag_name, key or key_regex, from).")
    otel_annotations: bool = setting(
        False, doc="Copy pod annotations resource.opentelemetry.io/<attribute> into resource attribute <attribute>."
    )
    deployment_name_from_replicaset: bool = setting(
        False,
        doc="Take k8s.deployment.name from the ReplicaSet's name less the pod-template-hash, without reading ReplicaSets "
        "(no get on replicasets needed; wrong for a ReplicaSet that no Deployment owns).",
    )


@dataclass(frozen=True, kw_only=True)
class AssociationSource:
    from_: Literal["resource_attribute", "connection"] = setting(
        "resource_attribute", key="from", doc="resource_attribute (an attribute of the resource, or of the record) or connection (the sending client's IP)."
    )
    name: str = setting("", doc="With resource_attribute: the attribute (k8s.pod.ip, k8s.pod.uid, container.id, k8s.pod.name, k8s.namespace.name).")


@dataclass(frozen=True, kw_only=True)
class AssociationRule:
    sources: list[AssociationSource] = setting(default_factory=list, doc="Up to 4 sources; the rule matches a pod when all of them do.")


@dataclass(frozen=True, kw_only=True)
class ExcludedPod:
    name: str = setting("", doc="A regular expression matched against whole pod names.")


@dataclass(frozen=True, kw_only=True)
class ExcludeConfig:
    pods: list[ExcludedPod] = setting(
        default_factory=lambda: [ExcludedPod(name=n) for n in DEFAULT_EXCLUDED_PODS],
        doc="Pods never associated with (their records pass unchanged). Default: jaeger-agent, jaeger-collector.",
    )


DEFAULT_ASSOCIATION = [
    AssociationRule(sources=[AssociationSource(from_="resource_attribute", name="k8s.pod.uid")]),
    AssociationRule(sources=[AssociationSource(from_="resource_attribute", name="container.id")]),
    AssociationRule(sources=[AssociationSource(from_="resource_attribute", name="k8s.pod.ip")]),
    AssociationRule(sources=[AssociationSource(from_="connection")]),
]


@dataclass(frozen=True, kw_only=True)
class Config(APIConfig):
    passthrough: bool = setting(False, doc="Only add k8s.pod.ip (the sending client's IP) to resources; no API access, no other attributes.")
    filter: FilterConfig = setting(default_factory=FilterConfig, doc="Which pods to cache.")
    extract: ExtractConfig = setting(default_factory=ExtractConfig, doc="What to add.")
    pod_association: list[AssociationRule] = setting(
        default_factory=list,
        doc="How a resource or record finds its pod: rules tried in order, the first that matches wins. Empty: k8s.pod.uid, "
        "container.id, k8s.pod.ip (from the resource, else from each record), then the connection.",
    )
    exclude: ExcludeConfig = setting(default_factory=ExcludeConfig, doc="Pods not to associate with.")
    wait_for_metadata: bool = setting(False, doc="Start only once the pod list is loaded (and the owners of its pods fetched).")
    wait_for_metadata_timeout: Duration = setting(Duration(10.0), doc="With wait_for_metadata: fail the start when loading takes longer.")
    pod_delete_grace_period: Duration = setting(
        Duration(120.0), doc="How long a deleted pod still resolves (exit and OOM records arrive after the deletion). 0: forget at once."
    )
    owner_lookup_concurrency: int = setting(4, doc="Owner objects (ReplicaSets, Jobs) fetched at once, for the owner chain of cached pods.")

    @property
    def association(self) -> list[AssociationRule]:
        return self.pod_association or DEFAULT_ASSOCIATION

    def validate(self) -> list[str]:
        problems = self.api_problems()
        problems += filter_problems("filter.", self.filter.fields, self.filter.labels)
        if self.filter.node_from_env_var and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.filter.node_from_env_var):
            problems.append(f"filter.node_from_env_var: {self.filter.node_from_env_var!r} is not an environment variable name")
        for i, name in enumerate(self.extract.metadata):
            if name.startswith("service."):
                problems.append(f"extract.metadata[{i}]: {name} is not supported by tapio (use extract.otel_annotations or a label rule)")
            elif name not in POD_METADATA and name not in CONTAINER_METADATA:
                problems.append(f"extract.metadata[{i}]: unknown attribute {name!r} (one of: {', '.join(sorted(POD_METADATA | CONTAINER_METADATA))})")
        for what in ("labels", "annotations"):
            for i, rule in enumerate(getattr(self.extract, what)):
                where = f"extract.{what}[{i}]"
                if bool(rule.key) == bool(rule.key_regex):
                    problems.append(f"{where}: set exactly one of key and key_regex")
                if rule.key_regex:
                    try:
                        compiled = re.compile(rule.key_regex)
                    except re.error as exc:
                        problems.append(f"{where}.key_regex: does not compile: {exc}")
                    else:
                        groups = {int(g) for g in re.findall(r"\$(\d+)", rule.tag_name)}
                        if groups and max(groups) > compiled.groups:
                            problems.append(f"{where}.tag_name: uses ${max(groups)} but key_regex has {compiled.groups} group(s)")
                elif "$" in rule.tag_name:
                    problems.append(f"{where}.tag_name: $ groups need key_regex")
        for i, rule in enumerate(self.pod_association):
            where = f"pod_association[{i}]"
            if not rule.sources:
                problems.append(f"{where}.sources: must name at least one source")
            if len(rule.sources) > MAX_SOURCES:
                problems.append(f"{where}.sources: at most {MAX_SOURCES} sources, got {len(rule.sources)}")
            for j, src in enumerate(rule.sources):
                if src.from_ == "resource_attribute":
                    if src.name not in ASSOCIATION_ATTRIBUTES:
                        problems.append(f"{where}.sources[{j}].name: {src.name!r} cannot find a pod (one of: {', '.join(sorted(ASSOCIATION_ATTRIBUTES))})")
                elif src.name:
                    problems.append(f"{where}.sources[{j}].name: only used with from: resource_attribute")
        for i, pod in enumerate(self.exclude.pods):
            try:
                re.compile(pod.name)
            except re.error as exc:
                problems.append(f"exclude.pods[{i}].name: does not compile: {exc}")
        if self.wait_for_metadata_timeout <= 0:
            problems.append("wait_for_metadata_timeout: must be more than 0s")
        if self.owner_lookup_concurrency < 1:
            problems.append(f"owner_lookup_concurrency: must be at least 1, got {self.owner_lookup_concurrency}")
        return problems
