"""End to end: the official OpenTelemetry SDK exporters → a real ``tapio run`` → the file exporter.

Everything here is real: the tapio process, its sockets, the SDK's gRPC and
HTTP exporters, the file on disk and /metrics over HTTP.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import threading
from pathlib import Path

import httpx
import pytest

from tapio import otlpjson
from tapio.pdata import Signal
from tapio.testing import prereq
from tapio.testing.process import ROOT, TapioProcess, free_port, metric_sum, tapio_command

SIGNAL_KEYS = {"resourceLogs": Signal.LOGS, "resourceSpans": Signal.TRACES, "resourceMetrics": Signal.METRICS}


def promtool() -> str:
    return prereq.command("promtool", "install Debian's prometheus package (scripts/setup.sh does)")


@pytest.mark.parametrize("ci, outcome", [("true", pytest.fail.Exception), ("", pytest.skip.Exception)])
def test_a_missing_prerequisite_fails_in_ci_and_skips_elsewhere(monkeypatch, ci, outcome):
    monkeypatch.setenv("CI", ci)
    with pytest.raises(outcome, match=r"^the no-such-tool-4f1c command is missing: apt-get install it"):
        prereq.command("no-such-tool-4f1c", "apt-get install it")
    assert prereq.command("sh", "never needed") == shutil.which("sh")


def test_free_ports_are_distinct_bindable_and_below_the_ephemeral_range():
    import socket

    ports = [free_port() for _ in range(300)]
    assert len(set(ports)) == len(ports)
    ephemeral_low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    if ephemeral_low > 21000:  # room below it (Linux's default starts at 32768)
        assert all(20000 <= p < ephemeral_low for p in ports), sorted(ports)[-3:]
    for port in ports[:5]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def write_config(tmp_path: Path, *, grpc: int, http: int, metrics: int, batch: str = "{timeout: 50ms}") -> Path:
    cfg = tmp_path / "pipelines.yaml"
    cfg.write_text(f"""
receivers:
  otlp:
    protocols:
      grpc: {{endpoint: "127.0.0.1:{grpc}"}}
      http: {{endpoint: "127.0.0.1:{http}"}}
processors:
  batch: {batch}
exporters:
  file: {{path: "{tmp_path}/out.jsonl"}}
service:
  pipelines:
    logs: {{receivers: [otlp], processors: [batch], exporters: [file]}}
    traces: {{receivers: [otlp], processors: [batch], exporters: [file]}}
    metrics: {{receivers: [otlp], processors: [batch], exporters: [file]}}
  telemetry:
    metrics: {{address: "127.0.0.1:{metrics}"}}
""")
    return cfg


def read_output(path: Path) -> dict[Signal, list]:
    out: dict[Signal, list] = {s: [] for s in Signal}
    for line in path.read_text().splitlines():
        key = next(iter(json.loads(line)))
        sig = SIGNAL_KEYS[key]
        out[sig].append(otlpjson.decode(sig, line.encode()))
    return out


def log_bodies(requests) -> list[str]:
    return [lr.body.string_value for r in requests for rl in r.resource_logs for sl in rl.scope_logs for lr in sl.log_records]


@pytest.fixture
def tapio(tmp_path):
    ports = {"grpc": free_port(), "http": free_port(), "metrics": free_port()}
    cfg = write_config(tmp_path, **ports)
    with TapioProcess([cfg], metrics_port=ports["metrics"]) as t:
        t.ports = ports
        t.out = tmp_path / "out.jsonl"
        t.wait_ready()
        yield t


def sdk_send_all(grpc_port: int, http_port: int, n_logs: int) -> None:
    """Send logs, spans and metrics with the official SDK over both gRPC and HTTP."""
    from opentelemetry.exporter.otlp.proto.grpc._log_exporter import OTLPLogExporter as GrpcLogs
    from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter as GrpcMetrics
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcSpans
    from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter as HttpLogs
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter as HttpMetrics
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpSpans
    from opentelemetry.sdk._logs import LoggerProvider
    from opentelemetry.sdk._logs.export import BatchLogRecordProcessor
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    grpc_ep, http_ep = f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{http_port}"
    for transport, logs_exp, span_exp, metric_exp in (
        ("grpc", GrpcLogs(endpoint=grpc_ep, insecure=True), GrpcSpans(endpoint=grpc_ep, insecure=True), GrpcMetrics(endpoint=grpc_ep, insecure=True)),
        ("http", HttpLogs(endpoint=http_ep + "/v1/logs"), HttpSpans(endpoint=http_ep + "/v1/traces"), HttpMetrics(endpoint=http_ep + "/v1/metrics")),
    ):
        resource = Resource.create({"service.name": f"e2e-{transport}"})
        lp = LoggerProvider(resource=resource)
        lp.add_log_record_processor(BatchLogRecordProcessor(logs_exp))
        otel_logger = lp.get_logger(f"e2e.{transport}")
        for i in range(n_logs):
            otel_logger.emit(body=f"hello {transport} {i}", severity_text="WARN", attributes={"attempt": i})
        assert lp.force_flush(10_000)
        lp.shutdown()

        tp = TracerProvider(resource=resource)
        tp.add_span_processor(BatchSpanProcessor(span_exp))
        tracer = tp.get_tracer("e2e")
        with tracer.start_as_current_span(f"parent-{transport}") as parent:
            parent.set_attribute("k8s.pod.name", "web-1")
            with tracer.start_as_current_span(f"child-{transport}"):
                pass
        assert tp.force_flush(10_000)
        tp.shutdown()

        reader = PeriodicExportingMetricReader(metric_exp, export_interval_millis=3_600_000)
        mp = MeterProvider(resource=resource, metric_readers=[reader])
        counter = mp.get_meter("e2e").create_counter(f"requests.{transport}")
        counter.add(7, {"route": "/a"})
        counter.add(5, {"route": "/b"})
        mp.shutdown()  # collects and exports once


def test_sdk_exporters_to_file(tapio):
    sdk_send_all(tapio.ports["grpc"], tapio.ports["http"], n_logs=25)

    def all_exported() -> bool:
        m = tapio.metrics()
        return (metric_sum(m, "tapio_exporter_sent_log_records_total") == 50
                and metric_sum(m, "tapio_exporter_sent_spans_total") == 4
                and metric_sum(m, "tapio_exporter_sent_metric_points_total") == 4)

    tapio.wait_for(all_exported, 30, "the file exporter to count everything sent")
    text = httpx.get(tapio.url + "/metrics", timeout=5).text
    check = subprocess.run([promtool(), "check", "metrics"], input=text.encode(), capture_output=True, timeout=30)
    assert check.returncode == 0, check.stdout.decode() + check.stderr.decode()
    m = tapio.metrics()
    # nothing disappears: accepted = sent + dropped + still queued, per signal
    for sig, item in (("logs", "log_records"), ("traces", "spans"), ("metrics", "metric_points")):
        accepted = metric_sum(m, f"tapio_receiver_accepted_{item}_total", receiver="otlp")
        sent = metric_sum(m, f"tapio_exporter_sent_{item}_total", exporter="file")
        dropped = metric_sum(m, "tapio_processor_dropped_items_total", otel_signal=sig)
        failed = metric_sum(m, f"tapio_exporter_send_failed_{item}_total")
        queued = metric_sum(m, "tapio_exporter_queue_size")
        assert accepted == sent + dropped + failed and queued == 0, (sig, accepted, sent, dropped, failed, queued)
    assert metric_sum(m, "tapio_receiver_accepted_log_records_total", receiver="otlp") == 50
    tapio.signal(signal.SIGTERM)
    assert tapio.wait_exit() == 0, tapio.stderr

    out = read_output(tapio.out)
    bodies = log_bodies(out[Signal.LOGS])
    assert sorted(bodies) == sorted([f"hello grpc {i}" for i in range(25)] + [f"hello http {i}" for i in range(25)])
    attempts = sorted(
        kv.value.int_value for r in out[Signal.LOGS] for rl in r.resource_logs for sl in rl.scope_logs
        for lr in sl.log_records for kv in lr.attributes if kv.key == "attempt"
    )
    assert attempts == sorted(list(range(25)) * 2)
    spans = {s.name: s for r in out[Signal.TRACES] for rs in r.resource_spans for ss in rs.scope_spans for s in ss.spans}
    assert set(spans) == {"parent-grpc", "child-grpc", "parent-http", "child-http"}
    for t in ("grpc", "http"):
        assert spans[f"child-{t}"].parent_span_id == spans[f"parent-{t}"].span_id
        assert spans[f"child-{t}"].trace_id == spans[f"parent-{t}"].trace_id
        assert {kv.key: kv.value.string_value for kv in spans[f"parent-{t}"].attributes} == {"k8s.pod.name": "web-1"}
    points = {
        (m.name, next(kv.value.string_value for kv in dp.attributes if kv.key == "route")): dp.as_int
        for r in out[Signal.METRICS] for rm in r.resource_metrics for sm in rm.scope_metrics for m in sm.metrics for dp in m.sum.data_points
    }
    assert points == {("requests.grpc", "/a"): 7, ("requests.grpc", "/b"): 5, ("requests.http", "/a"): 7, ("requests.http", "/b"): 5}
    services = {kv.value.string_value for r in out[Signal.LOGS] for rl in r.resource_logs for kv in rl.resource.attributes if kv.key == "service.name"}
    assert services == {"e2e-grpc", "e2e-http"}


def test_sigterm_during_steady_send_loses_nothing_acknowledged(tmp_path):
    ports = {"grpc": free_port(), "http": free_port(), "metrics": free_port()}
    # a long batch timeout keeps records inside the batch processor when SIGTERM arrives
    cfg = write_config(tmp_path, **ports, batch="{timeout: 10s, send_batch_size: 100000}")
    acked: list[int] = []
    stop = threading.Event()

    def sender() -> None:
        url = f"http://127.0.0.1:{ports['http']}/v1/logs"
        with httpx.Client(timeout=5) as client:
            i = 0
            while not stop.is_set():
                req = Signal.LOGS.request_class()
                sl = req.resource_logs.add().scope_logs.add()
                for j in range(10):
                    sl.log_records.add().body.string_value = f"r{i}-{j}"
                try:
                    r = client.post(url, content=req.SerializeToString(), headers={"content-type": "application/x-protobuf"})
                except httpx.TransportError:
                    return  # tapio closed the listener: nothing more is acknowledged
                if r.status_code == 200:
                    acked.append(i)
                i += 1

    with TapioProcess([cfg], metrics_port=ports["metrics"]) as t:
        t.wait_ready()
        th = threading.Thread(target=sender)
        th.start()
        try:
            t.wait_for(lambda: len(acked) >= 200, 30, "200 acknowledged requests")
            t.signal(signal.SIGTERM)
            assert t.wait_exit() == 0, t.stderr
        finally:
            stop.set()
            th.join(10)
    got = set(log_bodies(read_output(tmp_path / "out.jsonl")[Signal.LOGS]))
    missing = [i for i in acked if any(f"r{i}-{j}" not in got for j in range(10))]
    assert not missing, f"{len(missing)} acknowledged requests missing from the file, e.g. {missing[:5]}"


def test_start_banner_shows_the_ports_bound_not_port_0(tmp_path):
    import re
    import socket

    metrics = free_port()
    cfg = write_config(tmp_path, grpc=0, http=0, metrics=metrics)
    text = cfg.read_text().replace("exporters:\n", "exporters:\n  prometheus: {endpoint: '127.0.0.1:0'}\n", 1)
    cfg.write_text(text.replace("metrics: {receivers: [otlp], processors: [batch], exporters: [file]}",
                                "metrics: {receivers: [otlp], processors: [batch], exporters: [file, prometheus]}"))
    otlp = re.compile(r"receiver\s+otlp\s+grpc 127\.0\.0\.1:(\d+), http 127\.0\.0\.1:(\d+)$", re.M)
    prometheus = re.compile(r"exporter\s+prometheus\s+/metrics on 127\.0\.0\.1:(\d+)$", re.M)
    with TapioProcess([cfg], metrics_port=metrics) as t:
        t.wait_ready()
        t.wait_for(lambda: otlp.search(t.stderr) is not None and prometheus.search(t.stderr) is not None, 10, "the start banner")
        grpc_port, http_port = (int(p) for p in otlp.search(t.stderr).groups())
        prometheus_port = int(prometheus.search(t.stderr).group(1))
        assert 0 not in (grpc_port, http_port, prometheus_port) and len({grpc_port, http_port, prometheus_port}) == 3
        assert f"self-telemetry http://127.0.0.1:{metrics}/metrics" in t.stderr
        # the ports shown are the ones listening
        r = httpx.post(f"http://127.0.0.1:{http_port}/v1/logs", content=b"", headers={"content-type": "application/x-protobuf"}, timeout=5)
        assert r.status_code == 200, r.text
        assert httpx.get(f"http://127.0.0.1:{prometheus_port}/metrics", timeout=5).status_code == 200
        socket.create_connection(("127.0.0.1", grpc_port), timeout=5).close()
        t.signal(signal.SIGTERM)
        assert t.wait_exit() == 0, t.stderr


def require_ebpf() -> None:
    """The default pipelines include the ebpf receiver: root, bcc and kernel headers."""
    import importlib.util
    import os

    if os.geteuid() != 0:
        prereq.missing("root (the ebpf receiver of the default pipelines.yaml loads BPF programs)", "run the tests as root")
    if importlib.util.find_spec("bcc") is None:
        prereq.missing("bcc's Python package (for the ebpf receiver)", "run scripts/setup.sh")
    headers = Path(f"/lib/modules/{os.uname().release}/build/include")
    if not headers.is_dir():
        prereq.missing(f"kernel headers at {headers} (bcc compiles against them)", "run scripts/setup.sh")


def default_pipelines_env(state: Path) -> dict[str, str]:
    """Environment for the repository's pipelines.yaml: free ports and a state dir of the test's own."""
    return {
        "TAPIO_OTLP_GRPC_ENDPOINT": f"127.0.0.1:{free_port()}",
        "TAPIO_OTLP_HTTP_ENDPOINT": f"127.0.0.1:{free_port()}",
        "TAPIO_METRICS_ADDRESS": f"127.0.0.1:{free_port()}",
        "TAPIO_STATE_DIR": str(state),
    }


def test_default_pipelines_yaml_runs_and_writes_otlp_logs_to_its_file(tmp_path):
    import uuid

    require_ebpf()
    env = default_pipelines_env(tmp_path / "state")
    out = tmp_path / "state" / "otlp.jsonl"
    marker = uuid.uuid4().hex
    sent = [f"default-pipelines {marker} {i}" for i in range(5)]
    metrics_port = int(env["TAPIO_METRICS_ADDRESS"].rpartition(":")[2])
    with TapioProcess([ROOT / "pipelines.yaml"], metrics_port=metrics_port, env=env) as t:
        t.wait_ready(timeout=120)  # the ebpf receiver compiles its programs first
        req = Signal.LOGS.request_class()
        sl = req.resource_logs.add().scope_logs.add()
        for body in sent:
            sl.log_records.add().body.string_value = body
        url = f"http://{env['TAPIO_OTLP_HTTP_ENDPOINT']}/v1/logs"
        r = httpx.post(url, content=req.SerializeToString(), headers={"content-type": "application/x-protobuf"}, timeout=10)
        assert r.status_code == 200, r.text

        def written() -> bool:
            data = out.read_bytes() if out.exists() else b""
            return all(body.encode() in data for body in sent)

        t.wait_for(written, 30, f"the logs to appear in {out}")
        t.signal(signal.SIGTERM)
        assert t.wait_exit(timeout=60) == 0, t.stderr
    bodies = [b for b in log_bodies(read_output(out)[Signal.LOGS]) if marker in b]
    assert bodies == sent  # once each, in order, next to whatever the ebpf receiver saw meanwhile


def test_default_pipelines_yaml_turns_unanswered_dns_lookups_into_an_incident_trace(tmp_path):
    """Real kernel, real packets: lookups to a loopback address where no resolver listens are seen by dns-xdp
    on lo, reported unanswered after its timeout, and the correlate connector of the default pipelines joins
    ten of them from one client into a DNSFailureStorm incident written to the file as a trace."""
    import socket

    import dns.message

    require_ebpf()
    env = default_pipelines_env(tmp_path / "state")
    out = tmp_path / "state" / "otlp.jsonl"
    server = "127.83.0.1"  # on lo; nothing listens there on port 53
    metrics_port = int(env["TAPIO_METRICS_ADDRESS"].rpartition(":")[2])
    with TapioProcess([ROOT / "pipelines.yaml"], metrics_port=metrics_port, env=env) as t:
        t.wait_ready(timeout=120)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.bind(("127.0.0.1", 0))
            for i in range(12):
                client.sendto(dns.message.make_query(f"lookup-{i}.storm.example.", "A").to_wire(), (server, 53))

        spans: list = []

        def incident_written() -> bool:
            # read as it is written (the file may rotate later: the kernel events of a busy machine fill it)
            if out.exists():
                spans[:] = [
                    span
                    for line in out.read_bytes().splitlines()
                    if line.startswith(b'{"resourceSpans"') and b"DNSFailureStorm" in line and line.endswith(b"}")
                    for rs in otlpjson.decode(Signal.TRACES, line).resource_spans
                    for ss in rs.scope_spans
                    for span in ss.spans
                ]
            return any(s.name == "DNSFailureStorm" for s in spans)

        t.wait_for(incident_written, 60, "a DNSFailureStorm incident in the file")
        t.signal(signal.SIGTERM)
        assert t.wait_exit(timeout=60) == 0, t.stderr
    root = next(s for s in spans if s.name == "DNSFailureStorm")
    members = [s for s in spans if s.trace_id == root.trace_id and s.parent_span_id == root.span_id]
    assert len(members) >= 10
    attributes = {kv.key: kv.value for kv in root.attributes}
    assert "127.0.0.1" in attributes["tapio.incident.summary"].string_value
    assert server in attributes["tapio.incident.summary"].string_value


def test_validate_and_graph_have_no_side_effects(tmp_path):
    state, out_dir = tmp_path / "state", tmp_path / "out"
    cfg = tmp_path / "pipelines.yaml"
    cfg.write_text(f"""
receivers:
  otlp: {{protocols: {{http: {{endpoint: "127.0.0.1:{free_port()}"}}}}}}
exporters:
  file: {{path: "{out_dir}/deeper/logs.jsonl"}}
  otlphttp:
    endpoint: http://127.0.0.1:1
    sending_queue: {{storage: storage}}
extensions:
  storage: {{}}
  storage/explicit: {{path: "{state}/explicit/tapio.db"}}
service:
  extensions: [storage, storage/explicit]
  pipelines:
    logs: {{receivers: [otlp], exporters: [file, otlphttp]}}
""")
    env = {**default_pipelines_env(state)}
    for args in (("validate", "-c", str(cfg)), ("graph", "-c", str(cfg)), ("validate",)):
        res = run_cli(*args, env=env)
        assert res.returncode == 0, res.stderr
    # neither the storage DB (default or explicit path) nor the file exporter's directory was made
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipelines.yaml"]


def run_cli(*args: str, cwd: Path = ROOT, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run([*tapio_command(), *args], capture_output=True, text=True, timeout=60, cwd=cwd, env={**os.environ, **(env or {})})


def test_port_in_use_fails_at_start_naming_the_component(tmp_path):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cfg = write_config(tmp_path, grpc=free_port(), http=port, metrics=free_port())
        res = run_cli("run", "-c", str(cfg))
    assert res.returncode == 1, res.stderr
    assert "receiver otlp failed to start" in res.stderr
    assert f"127.0.0.1:{port}" in res.stderr
    assert "what to do:" in res.stderr
    assert "Traceback" not in res.stderr


def test_default_pipelines_yaml_validates_and_graphs():
    res = run_cli("validate")
    assert res.returncode == 0, res.stderr
    assert "valid (4 pipelines" in res.stdout
    res = run_cli("graph")
    assert res.returncode == 0 and res.stdout.startswith("flowchart LR"), res.stderr
    res = run_cli("graph", "--format", "dot")
    assert res.returncode == 0 and res.stdout.startswith("digraph tapio"), res.stderr
    res = run_cli("components")
    assert res.returncode == 0
    for t in ("otlp", "batch", "debug", "file"):
        assert f" {t} " in res.stdout
    res = run_cli("--help")
    assert "examples:" in res.stdout
    res = run_cli("--version")
    assert res.stdout.startswith("tapio ")


def test_an_exporter_queues_into_the_storage_extension_it_names(tmp_path):
    """With two storage extensions, `sending_queue.storage: storage/b` writes b's file, never a's."""
    from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest

    from tapio.storage import Storage

    http, metrics_port = free_port(), free_port()
    cfg = tmp_path / "pipelines.yaml"
    cfg.write_text(f"""
receivers:
  otlp: {{acknowledge: delivered, protocols: {{http: {{endpoint: "127.0.0.1:{http}"}}}}}}
exporters:
  otlphttp:
    endpoint: http://127.0.0.1:1
    retry_on_failure: {{initial_interval: 1s}}
    sending_queue: {{storage: storage/b}}
extensions:
  storage/a: {{path: "{tmp_path}/a.db"}}
  storage/b: {{path: "{tmp_path}/b.db"}}
service:
  extensions: [storage/a, storage/b]
  pipelines:
    logs: {{receivers: [otlp], exporters: [otlphttp]}}
  telemetry: {{metrics: {{address: "127.0.0.1:{metrics_port}"}}}}
""")
    req = ExportLogsServiceRequest()
    req.resource_logs.add().scope_logs.add().log_records.add().body.string_value = "kept in b"
    with TapioProcess([cfg], metrics_port=metrics_port) as t:
        t.wait_ready()
        r = httpx.post(f"http://127.0.0.1:{http}/v1/logs", content=req.SerializeToString(),
                       headers={"content-type": "application/x-protobuf"}, timeout=10)
        assert r.status_code == 200, r.text  # acknowledged: on disk in the queue
        t.signal(signal.SIGTERM)
        assert t.wait_exit(timeout=60) == 0, t.stderr
        assert "in storage storage/b" in t.stderr
    with Storage.open(tmp_path / "a.db") as a, Storage.open(tmp_path / "b.db") as b:
        assert a.queue_sizes() == {}
        assert b.queue_sizes() == {"exporter/otlphttp": (1, b.queue_sizes()["exporter/otlphttp"][1])}
        (item,) = b.queue("exporter/otlphttp").peek(1)
        assert b"kept in b" in item[1]


def test_a_misspelled_storage_reference_fails_validate_naming_file_and_line(tmp_path):
    cfg = tmp_path / "pipelines.yaml"
    cfg.write_text("""\
receivers:
  otlp: {}
exporters:
  otlphttp:
    endpoint: http://127.0.0.1:1
    sending_queue: {storage: storagee}
extensions:
  storage: {}
service:
  extensions: [storage]
  pipelines:
    logs: {receivers: [otlp], exporters: [otlphttp]}
""")
    res = run_cli("validate", "-c", str(cfg))
    assert res.returncode == 1
    assert f"{cfg}:6:30: exporters.otlphttp.sending_queue.storage: storage extension 'storagee' is not defined in extensions; did you mean 'storage'?" in res.stderr
    assert "Traceback" not in res.stderr
