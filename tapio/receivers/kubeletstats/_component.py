"""The running kubeletstats receiver: scrape the kubelet every collection_interval, hand one metrics batch on.

Invariants:
- Startup reads what authentication needs (token, CA, client certificate)
  and fails naming a file that cannot be read; nothing else fails after start.
- One scrape = GET /stats/summary (and /pods with ``utilization``), each
  with the ``timeout`` deadline, over httpx on trio; the documents are
  parsed and turned into metrics in a worker thread (a 110-pod summary is
  milliseconds of work), under the receiver's own limiter of one thread.
- A failed scrape (network, HTTP status, a document that is not a summary)
  is counted by reason and logged when the reason changes; the next scrape
  happens on schedule. A failed /pods only leaves the utilisation out; it
  is counted by reason too and logged when the reason changes (a 403 names
  the permission it lacks).
- Scrapes start every ``collection_interval`` from the first, not from the
  end of the previous one; a scrape that overruns makes the next start late
  instead of two running at once.
"""

from __future__ import annotations

import collections
import os
import re
import ssl
import time
from pathlib import Path

import httpx
import trio

from tapio.component import Ports, Refused, Settings
from tapio.pdata import Batch, Signal
from tapio.telemetry import COUNTER

from ._config import Config
from ._summary import PodSpecs, SummaryError, metrics_request, parse_pod_specs, parse_summary

_ENV = re.compile(r"\$\{env:([A-Za-z_][A-Za-z0-9_]*)\}")


class KubeletStartupError(Exception):
    """The receiver cannot start: a credential file or the endpoint's environment variable is missing."""


def resolve_endpoint(endpoint: str, env: dict[str, str] | os._Environ = os.environ) -> str:
    """``endpoint`` with each ``${env:NAME}`` replaced; raises `KubeletStartupError` naming an unset variable."""

    def value(m: re.Match) -> str:
        found = env.get(m.group(1))
        if not found:
            raise KubeletStartupError(
                f"endpoint {endpoint!r} needs the environment variable {m.group(1)}: set it from the downward API (fieldRef spec.nodeName) or set endpoint"
            )
        return found

    return _ENV.sub(value, endpoint).rstrip("/")


def _read(path: str, what: str) -> str:
    try:
        return Path(path).read_text()
    except OSError as exc:
        raise KubeletStartupError(f"cannot read the {what} {path}: {exc.strerror or exc}") from None


class KubeletStatsReceiver:
    def __init__(self, settings: Settings, config: Config, ports: Ports) -> None:
        if ports.output is None:
            raise ValueError("the kubeletstats receiver needs an output")
        self._settings = settings
        self._config = config
        self._output = ports.output
        self._telemetry = settings.telemetry
        self._log = settings.logger
        self._limiter = trio.CapacityLimiter(1)
        self._last_failure = ""
        self._last_pods_failure = ""
        #: completed scrapes (tests and benches wait on it)
        self.scrapes = 0
        self.scraped = trio.Event()
        #: trio times at which the latest scrapes started
        self.started_at: collections.deque[float] = collections.deque(maxlen=64)
        for name, help_text in (
            ("tapio_kubeletstats_scrapes_total", "Scrapes of the kubelet's /stats/summary, by outcome (ok or the failure's reason)."),
            ("tapio_kubeletstats_points_skipped_total", "Summary values left out because they were missing or of the wrong type."),
            ("tapio_kubeletstats_pod_specs_total", "Fetches of the kubelet's /pods for the utilization metrics, by outcome (ok or the failure's reason)."),
        ):
            settings.telemetry.declare(name, COUNTER, help_text)

    def _headers(self) -> dict[str, str]:
        """The bearer token header (auth_type serviceAccount), read from its file now."""
        if self._config.auth_type != "serviceAccount":
            return {}
        token = _read(f"{self._config.service_account_dir}/token", "service account token").strip()
        return {"Authorization": f"Bearer {token}"}

    def _ssl_context(self) -> ssl.SSLContext | bool:
        """How to verify the kubelet (False for http://); raises `KubeletStartupError` for an unreadable file."""
        config = self._config
        if not self._endpoint.startswith("https://"):
            return False
        ctx = ssl.create_default_context()
        ca = config.ca_file or (f"{config.service_account_dir}/ca.crt" if config.auth_type == "serviceAccount" else "")
        if config.insecure_skip_verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        elif ca:
            ctx.load_verify_locations(cadata=_read(ca, "CA file"))
        if config.cert_file:
            _read(config.cert_file, "client certificate")
            _read(config.key_file, "client key")
            ctx.load_cert_chain(config.cert_file, config.key_file)
        return ctx

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        config = self._config
        self._endpoint = resolve_endpoint(config.endpoint)
        verify = self._ssl_context()
        headers = self._headers()
        client = httpx.AsyncClient(verify=verify, timeout=float(config.timeout), trust_env=False)
        self._log.info("%s: scraping %s/stats/summary every %gs (%s)", self._settings.id, self._endpoint, float(config.collection_interval), config.auth_type)
        try:
            task_status.started()
            await trio.sleep(float(config.initial_delay))
            next_at = trio.current_time()
            while True:
                try:
                    headers = self._headers()  # a rotated token is used from the next scrape on
                except KubeletStartupError as exc:
                    self._log.warning("%s: %s; using the token read before", self._settings.id, exc)
                await self.scrape(client, headers)
                next_at += float(config.collection_interval)
                now = trio.current_time()
                if next_at < now:  # overran: start the next on schedule from now
                    next_at = now
                await trio.sleep_until(next_at)
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(self._settings.shutdown_grace):
                await client.aclose()

    async def _get(self, client: httpx.AsyncClient, path: str, headers: dict[str, str]) -> bytes:
        response = await client.get(self._endpoint + path, headers=headers)
        if response.status_code != 200:
            raise _Failed(f"http_{response.status_code}", f"GET {path}: HTTP {response.status_code} {response.text[:200]}")
        return response.content

    async def _pod_specs(self, client: httpx.AsyncClient, headers: dict[str, str]) -> bytes | None:
        """The kubelet's /pods, or None (counted, and logged when the reason changes): the utilization is left out."""
        try:
            pods_bytes = await self._get(client, "/pods", headers)
        except (httpx.HTTPError, _Failed) as exc:
            reason = exc.reason if isinstance(exc, _Failed) else type(exc).__name__.lower()
            self._telemetry.add("tapio_kubeletstats_pod_specs_total", outcome=reason)
            if reason != self._last_pods_failure:
                hint = " (the service account needs get on nodes/pods, or nodes/proxy on kubelets before 1.33)" if reason == "http_403" else ""
                self._log.warning("%s: %s%s: the utilization metrics are left out", self._settings.id, exc, hint)
                self._last_pods_failure = reason
            return None
        self._telemetry.add("tapio_kubeletstats_pod_specs_total", outcome="ok")
        self._last_pods_failure = ""
        return pods_bytes

    async def scrape(self, client: httpx.AsyncClient, headers: dict[str, str]) -> None:
        """One scrape: fetch, parse, convert, hand on; failures are counted, never raised."""
        config = self._config
        self.started_at.append(trio.current_time())
        try:
            try:
                summary_bytes = await self._get(client, "/stats/summary", headers)
            except httpx.HTTPError as exc:
                raise _Failed(type(exc).__name__.lower(), f"GET /stats/summary: {exc or type(exc).__name__}") from None
            pods_bytes = None
            if config.utilization and {"pod", "container"} & set(config.metric_groups):
                pods_bytes = await self._pod_specs(client, headers)
            now = time.time_ns()

            def convert() -> tuple[Batch, int, str]:
                summary = parse_summary(summary_bytes)
                specs: PodSpecs | None = None
                note = ""
                if pods_bytes is not None:
                    try:
                        specs = parse_pod_specs(pods_bytes)
                    except SummaryError as exc:
                        note = exc.reason
                build = metrics_request(summary, groups=config.metric_groups, now_ns=now, specs=specs)
                return Batch(Signal.METRICS, [build.request], build.points), build.skipped, note

            try:
                batch, skipped, note = await trio.to_thread.run_sync(convert, limiter=self._limiter)
            except SummaryError as exc:
                self._telemetry.bad_input(exc.reason)
                raise _Failed(exc.reason, f"{self._endpoint}/stats/summary: {exc}") from None
            if note:
                self._telemetry.bad_input(f"pods_{note}")
            self._telemetry.add("tapio_kubeletstats_points_skipped_total", skipped)
            if batch.count:
                try:
                    await self._output.send(batch)
                except Refused:
                    raise _Failed("refused", "the pipeline refused the scrape's metrics") from None
        except _Failed as failure:
            self._telemetry.add("tapio_kubeletstats_scrapes_total", outcome=failure.reason)
            if failure.reason != self._last_failure:
                self._log.warning("%s: scrape failed: %s", self._settings.id, failure)
                self._last_failure = failure.reason
            return
        finally:
            self.scrapes += 1
            scraped, self.scraped = self.scraped, trio.Event()
            scraped.set()
        if self._last_failure:
            self._log.info("%s: scraping %s again", self._settings.id, self._endpoint)
            self._last_failure = ""
        self._telemetry.add("tapio_kubeletstats_scrapes_total", outcome="ok")


class _Failed(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
