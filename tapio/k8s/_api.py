"""Reaching the Kubernetes API: the shared auth settings, a connection, selectors and GETs.

Invariants:
- Configuration (kubeconfig, in-cluster service account) is loaded by the
  `kubernetes` package's own loaders, in a worker thread with a deadline and
  a limiter of this module's own (they read files and may run a kubeconfig
  ``exec`` credential plugin). The bearer token is asked for again before
  every list, watch and get, through the same thread: the package's refresh
  hook re-reads a rotated service-account token and re-runs an expired exec
  plugin, and tapio never caches a token longer than that.
- Requests go over httpx on trio. The token is never logged: errors name the
  server and the status, never the headers.
- `Connection.identity` names the server and the way of authenticating (not
  the token, which rotates), so components that use the same API the same
  way can share one watch (see `_watch`).
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import quote

import httpx
import trio

from tapio.component import setting
from tapio.units import Duration

#: where the in-cluster service account's files are (a pod's standard mount)
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
#: longest a config load or token refresh may take (an exec plugin can be slow)
LOAD_TIMEOUT_SECONDS = 30.0

AuthType = Literal["none", "serviceAccount", "kubeConfig"]

#: resource (plural, as in the API path) -> (API path prefix, kind, namespaced)
RESOURCES: dict[str, tuple[str, str, bool]] = {
    "pods": ("/api/v1", "Pod", True),
    "nodes": ("/api/v1", "Node", False),
    "namespaces": ("/api/v1", "Namespace", False),
    "events": ("/api/v1", "Event", True),
    "replicasets": ("/apis/apps/v1", "ReplicaSet", True),
    "deployments": ("/apis/apps/v1", "Deployment", True),
    "statefulsets": ("/apis/apps/v1", "StatefulSet", True),
    "daemonsets": ("/apis/apps/v1", "DaemonSet", True),
    "jobs": ("/apis/batch/v1", "Job", True),
    "cronjobs": ("/apis/batch/v1", "CronJob", True),
}
#: an owner reference's kind -> the resource to GET it from
RESOURCE_OF_KIND = {kind: resource for resource, (_, kind, _) in RESOURCES.items()}


class KubeApiError(Exception):
    """The API answered with an error status, or could not be reached (``status`` 0)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class KubeConfigError(Exception):
    """The configured way of reaching the API does not work here (no kubeconfig, not in a pod ...)."""


def node_name(node: str, env_var: str) -> str:
    """The node a per-node agent keeps to: ``$env_var`` when set (the downward API's spec.nodeName), else ``node``.

    Raises RuntimeError naming the variable when ``env_var`` is given but unset or empty.
    """
    if not env_var:
        return node
    value = os.environ.get(env_var, "")
    if not value:
        raise RuntimeError(
            f"filter.node_from_env_var: ${env_var} is not set or empty (set it from the downward API: valueFrom.fieldRef.fieldPath: spec.nodeName)"
        )
    return value


# ---------------------------------------------------------------- settings


@dataclass(frozen=True, kw_only=True)
class APIConfig:
    """How to reach and authenticate to the Kubernetes API (the OTel Collector's APIConfig)."""

    auth_type: AuthType = setting(
        "serviceAccount",
        doc="How to authenticate: serviceAccount (the pod's service account, in-cluster), kubeConfig "
        "(a kubeconfig file, as kubectl), or none (the in-cluster API address without credentials).",
    )
    kube_config_path: str = setting(
        "",
        doc="With kubeConfig: the kubeconfig file. Empty means $KUBECONFIG (several files separated by ':' are merged), else ~/.kube/config.",
    )
    context: str = setting("", doc="With kubeConfig: the context to use. Empty means the file's current-context.")

    def api_problems(self) -> list[str]:
        problems = []
        if self.auth_type != "kubeConfig":
            for key in ("kube_config_path", "context"):
                if getattr(self, key):
                    problems.append(f"{key}: only used with auth_type kubeConfig (auth_type is {self.auth_type})")
        return problems


@dataclass(frozen=True, kw_only=True)
class FieldFilter:
    key: str = setting("", doc="The field (fields) or label (labels) key.")
    value: str = setting("", doc="The value compared with. Unused by exists and does-not-exist.")
    op: Literal["equals", "not-equals", "exists", "does-not-exist"] = setting(
        "equals", doc="equals or not-equals; labels also take exists and does-not-exist."
    )


def label_selector(filters: list[FieldFilter]) -> str:
    """A labelSelector query value for the filters (ANDed)."""
    parts = []
    for f in filters:
        if f.op == "equals":
            parts.append(f"{f.key}={f.value}")
        elif f.op == "not-equals":
            parts.append(f"{f.key}!={f.value}")
        elif f.op == "exists":
            parts.append(f.key)
        else:
            parts.append(f"!{f.key}")
    return ",".join(parts)


def field_selector(filters: list[FieldFilter], extra: list[str] = ()) -> str:
    parts = list(extra)
    for f in filters:
        parts.append(f"{f.key}{'=' if f.op == 'equals' else '!='}{f.value}")
    return ",".join(parts)


def filter_problems(prefix: str, fields: list[FieldFilter], labels: list[FieldFilter]) -> list[str]:
    problems = []
    for name, filters in (("fields", fields), ("labels", labels)):
        for i, f in enumerate(filters):
            where = f"{prefix}{name}[{i}]"
            if not f.key:
                problems.append(f"{where}.key: must not be empty")
            elif any(c in f.key for c in ",= !"):
                problems.append(f"{where}.key: {f.key!r} must not contain ',', '=', '!' or spaces")
            if "," in f.value:
                problems.append(f"{where}.value: {f.value!r} must not contain ','")
            if name == "fields" and f.op not in ("equals", "not-equals"):
                problems.append(f"{where}.op: field selectors take equals or not-equals, got {f.op}")
    return problems


# ---------------------------------------------------------------- the connection


@dataclass
class Connection:
    """An API server and the credentials for it; `client` opens an httpx client to it.

    Holds the `kubernetes` package's Configuration, whose refresh hook renews
    tokens (see `authorization`).
    """

    host: str
    verify: ssl.SSLContext | bool
    #: (host, auth_type, kubeconfig, context): what sharing a watch is keyed by
    identity: tuple[str, ...]
    _configuration: Any = field(default=None, repr=False)
    #: one token refresh at a time for this connection
    _limiter: trio.CapacityLimiter = field(default_factory=lambda: trio.CapacityLimiter(1), repr=False)

    async def authorization(self) -> dict[str, str]:
        """The Authorization header to send now ({} without credentials), renewed when the loader says so."""
        if self._configuration is None:
            return {}
        return await _in_thread(self._limiter, _auth_header, self._configuration)

    def client(self, *, timeout: float = 30.0) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.host, verify=self.verify, timeout=httpx.Timeout(timeout), trust_env=False)


def _auth_header(configuration: Any) -> dict[str, str]:
    token = configuration.get_api_key_with_prefix("BearerToken") or configuration.get_api_key_with_prefix("authorization")
    if token:
        # the loaders store "bearer <token>" or "Bearer <token>"; send the scheme as the RFC spells it
        scheme, _, value = token.partition(" ")
        return {"Authorization": f"Bearer {value}" if scheme.lower() == "bearer" and value else token}
    if configuration.username or configuration.password:
        return {"Authorization": configuration.get_basic_auth_token()}
    return {}


async def _in_thread(limiter: trio.CapacityLimiter, fn: Any, *args: Any) -> Any:
    # the kubernetes package's loaders block (files, exec plugins): never on the event loop
    with trio.fail_after(LOAD_TIMEOUT_SECONDS):
        return await trio.to_thread.run_sync(fn, *args, limiter=limiter, abandon_on_cancel=True)


async def connect(api: APIConfig) -> Connection:
    """Load the configured credentials (in a worker thread) into a `Connection`.

    Raises `KubeConfigError` saying what is missing (no kubeconfig, not
    running in a pod, an unknown context ...).
    """
    try:
        return await _in_thread(trio.CapacityLimiter(1), _load, api)
    except trio.TooSlowError:
        raise KubeConfigError(f"loading the Kubernetes credentials ({api.auth_type}) took longer than {LOAD_TIMEOUT_SECONDS:g}s") from None


def _load(api: APIConfig) -> Connection:
    from kubernetes import client as k8s_client
    from kubernetes import config as k8s_config
    from kubernetes.config import incluster_config

    configuration = k8s_client.Configuration()
    if api.auth_type == "kubeConfig":
        path = os.path.expanduser(api.kube_config_path) if api.kube_config_path else None
        shown = path or os.environ.get("KUBECONFIG") or "~/.kube/config"
        try:
            k8s_config.load_kube_config(config_file=path, context=api.context or None, client_configuration=configuration, persist_config=False)
        except (k8s_config.ConfigException, OSError, ValueError, TypeError, KeyError) as exc:
            raise KubeConfigError(f"cannot use the kubeconfig {shown}{' context ' + repr(api.context) if api.context else ''}: {exc}") from None
        identity = (configuration.host, api.auth_type, path or os.environ.get("KUBECONFIG", ""), api.context)
    else:
        host = os.environ.get(incluster_config.SERVICE_HOST_ENV_NAME, "")
        port = os.environ.get(incluster_config.SERVICE_PORT_ENV_NAME, "")
        if not host or not port:
            raise KubeConfigError(
                f"auth_type {api.auth_type} needs to run in a pod ($KUBERNETES_SERVICE_HOST and $KUBERNETES_SERVICE_PORT are not set); "
                "outside a cluster use auth_type: kubeConfig"
            )
        token_file = os.path.join(SERVICE_ACCOUNT_DIR, "token")
        ca_file = os.path.join(SERVICE_ACCOUNT_DIR, "ca.crt")
        if api.auth_type == "serviceAccount":
            loader = incluster_config.InClusterConfigLoader(token_filename=token_file, cert_filename=ca_file)
            try:
                loader.load_and_set(configuration)
            except (k8s_config.ConfigException, OSError) as exc:
                raise KubeConfigError(f"cannot use the pod's service account in {SERVICE_ACCOUNT_DIR}: {exc}") from None
        else:
            configuration.host = "https://" + incluster_config._join_host_port(host, port)
            configuration.ssl_ca_cert = ca_file if os.path.isfile(ca_file) else None
        identity = (configuration.host, api.auth_type, "", "")
    return Connection(host=configuration.host.rstrip("/"), verify=_ssl_context(configuration), identity=identity, _configuration=configuration)


def _ssl_context(configuration: Any) -> ssl.SSLContext | bool:
    if not configuration.host.startswith("https"):
        return True  # plain HTTP: nothing to verify
    try:
        ctx = ssl.create_default_context(cafile=configuration.ssl_ca_cert or None)
        if configuration.cert_file:
            ctx.load_cert_chain(configuration.cert_file, configuration.key_file or None)
    except (OSError, ssl.SSLError) as exc:
        raise KubeConfigError(f"cannot load the TLS files for {configuration.host}: {exc}") from None
    if not configuration.verify_ssl:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


# ---------------------------------------------------------------- paths and GETs


def collection_path(resource: str, namespace: str = "") -> str:
    prefix, _, namespaced = RESOURCES[resource]
    if namespace and namespaced:
        return f"{prefix}/namespaces/{quote(namespace, safe='')}/{resource}"
    return f"{prefix}/{resource}"


def object_path(resource: str, name: str, namespace: str = "") -> str:
    return f"{collection_path(resource, namespace)}/{quote(name, safe='')}"


async def get_object(connection: Connection, client: httpx.AsyncClient, resource: str, name: str, namespace: str = "") -> dict | None:
    """One object by name; None when it does not exist (404). Raises `KubeApiError` on other failures."""
    path = object_path(resource, name, namespace)
    try:
        response = await client.get(path, headers=await connection.authorization())
    except httpx.HTTPError as exc:
        raise KubeApiError(0, f"GET {connection.host}{path}: {http_error_text(exc)}") from None
    if response.status_code == 404:
        return None
    if response.status_code != 200:
        raise KubeApiError(response.status_code, f"GET {connection.host}{path}: HTTP {response.status_code}: {status_message(response.content)}")
    try:
        return response.json()
    except ValueError as exc:
        raise KubeApiError(response.status_code, f"GET {connection.host}{path}: not JSON: {exc}") from None


def http_error_text(exc: BaseException) -> str:
    """An httpx error with what caused it (a ConnectError's own text is often empty; the TLS or socket error is its cause)."""
    parts = []
    cur: BaseException | None = exc
    while cur is not None and len(parts) < 4:
        text = str(cur)
        if text and text not in parts:
            parts.append(text)
        cur = cur.__cause__ or cur.__context__
    return f"{type(exc).__name__}: {'; '.join(parts) or 'no detail'}"


def status_message(body: bytes) -> str:
    """The message of a Status body, or the start of the body."""
    import json

    try:
        doc = json.loads(body)
        if isinstance(doc, dict) and doc.get("message"):
            return str(doc["message"])[:300]
    except ValueError:
        pass
    return body[:200].decode("utf-8", "replace")
