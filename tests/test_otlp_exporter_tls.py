"""TLS and mutual TLS of both exporters against the reference sink, with a CA and certificates made here."""

from __future__ import annotations

import functools
import os
import shutil
import ssl
import subprocess
import sys
import tempfile
import threading
import warnings
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from tapio.config import decode_dataclass
from tapio.exporters.otlp._config import GrpcExporterConfig, HttpExporterConfig
from tapio.tls import client_ssl_context, file_problem

from tapio.pdata import Signal
from tapio.testing.otlpsink import SinkTLS, open_otlp_sink
from tapio.testing import prereq

from tapio.testing.batches import log_batch, numbered

from .test_otlp_exporter import Exporter, running

NO_RETRY = {"enabled": False}


class Certs:
    def __init__(self, root: Path) -> None:
        self.root = root

    def __getattr__(self, name: str) -> str:
        return str(self.root / name.replace("_", "."))


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Certs:
    prereq.command("openssl", "it makes the test certificates: apt-get install openssl (scripts/setup.sh does)")
    d = tmp_path_factory.mktemp("certs")
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=tapio test CA",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)
    for name, usage in (("server", "serverAuth"), ("client", "clientAuth")):
        (d / f"{name}.ext").write_text(
            "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
            f"extendedKeyUsage={usage}\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n"
            "authorityKeyIdentifier=keyid\nsubjectKeyIdentifier=hash\n"
        )
        _openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN=tapio test {name}", cwd=d)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=d)
    # a second CA that signed nothing: trusting it must not be enough
    _openssl("req", "-x509", *ec, "-keyout", "other.key", "-out", "other.pem", "-days", "2", "-subj", "/CN=other CA",
             "-addext", "basicConstraints=critical,CA:TRUE", cwd=d)
    return Certs(d)


def tls_sink(certs: Certs, mutual: bool):
    return open_otlp_sink(tls=SinkTLS(certs.server_pem, certs.server_key, certs.ca_pem if mutual else ""))


def endpoint(transport: str, sink) -> str:
    return sink.grpc_endpoint if transport == "grpc" else sink.http_url("https")


@pytest.mark.parametrize("transport", ["grpc", "http"])
async def test_tls_with_the_servers_ca(transport, certs):
    async with tls_sink(certs, mutual=False) as sink:
        async with running(transport, sink, {"endpoint": endpoint(transport, sink), "tls": {"insecure": False, "ca_file": certs.ca_pem}}) as ex:
            await ex.send.send(log_batch(numbered(3, "s:")))
        assert sink.items() == 3 and ex.sent() == 3


@pytest.mark.parametrize("transport", ["grpc", "http"])
async def test_tls_refuses_a_server_signed_by_an_untrusted_ca(transport, certs):
    async with tls_sink(certs, mutual=False) as sink:
        cfg = {"endpoint": endpoint(transport, sink), "tls": {"insecure": False, "ca_file": certs.other_pem}, "retry_on_failure": NO_RETRY}
        async with running(transport, sink, cfg) as ex:
            await ex.send.send(log_batch(numbered(3, "s:")))
        assert sink.items() == 0 and ex.failed(reason="unavailable" if transport == "grpc" else "connection_error") == 3


async def test_http_insecure_skip_verify_accepts_any_certificate(certs):
    async with tls_sink(certs, mutual=False) as sink:
        cfg = {"endpoint": sink.http_url("https"), "tls": {"insecure_skip_verify": True, "min_version": "1.3"}}
        async with running("http", sink, cfg) as ex:
            await ex.send.send(log_batch(numbered(2, "s:")))
        assert sink.items() == 2 and ex.sent() == 2


@pytest.mark.parametrize("transport", ["grpc", "http"])
async def test_mutual_tls(transport, certs):
    async with tls_sink(certs, mutual=True) as sink:
        tls = {"insecure": False, "ca_file": certs.ca_pem, "cert_file": certs.client_pem, "key_file": certs.client_key}
        async with running(transport, sink, {"endpoint": endpoint(transport, sink), "tls": tls}) as ex:
            await ex.send.send(log_batch(numbered(4, "s:")))
        assert sink.items() == 4 and ex.sent() == 4

        # without a client certificate the server refuses the handshake
        cfg = {"endpoint": endpoint(transport, sink), "tls": {"insecure": False, "ca_file": certs.ca_pem}, "retry_on_failure": NO_RETRY}
        async with running(transport, sink, cfg) as ex:
            await ex.send.send(log_batch(numbered(4, "s:")))
        assert sink.items() == 4 and ex.failed() == 4


@pytest.mark.parametrize("transport", ["grpc", "http"])
async def test_tls_files_gone_by_start_fail_it_naming_the_file(transport, certs, tmp_path):
    gone = tmp_path / "nope.pem"
    shutil.copy(certs.ca_pem, gone)
    async with open_otlp_sink() as sink:
        ex = Exporter(transport, {"endpoint": endpoint(transport, sink), "tls": {"insecure": False, "ca_file": str(gone)}})  # validates
        gone.unlink()  # removed between validate and start
        with pytest.raises(OSError, match="nope.pem"):
            with trio.fail_after(10):
                await ex.component.run()
    assert Signal.LOGS  # the exporter never started: nothing to count


# ---------------------------------------------------------------- tls.min_version


@pytest.mark.parametrize("version, ok", [("1.0", False), ("1.1", False), ("1.2", True), ("1.3", False)])
def test_grpc_min_version_other_than_1_2_is_a_config_problem(version, ok):
    cfg = decode_dataclass(GrpcExporterConfig, {"endpoint": "otel:4317", "tls": {"min_version": version}}, validate=False)
    problems = cfg.validate()
    if ok:
        assert problems == []
    else:
        assert len(problems) == 1 and problems[0].startswith("tls.min_version: the gRPC exporter cannot "), problems
        assert "write 1.2" in problems[0]
    http = decode_dataclass(HttpExporterConfig, {"endpoint": "https://otel:4318", "tls": {"min_version": version}}, validate=False)
    assert http.validate() == []


_SSL_VERSIONS = {"1.1": "TLSv1_1", "1.2": "TLSv1_2", "1.3": "TLSv1_3"}


@asynccontextmanager
async def tls_handshake_probe(certs: Certs, max_version: str):
    """A TLS server that offers TLS 1.0 up to ``max_version``, records each handshake's outcome and hangs up.

    Yields its port and a list of outcomes ("TLSv1.2", … or "failed"), and an
    event set after the first handshake ended either way.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(certs.server_pem, certs.server_key)
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")  # let OpenSSL 3 offer 1.0 and 1.1 at all
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLSv1 and TLSv1_1 are deprecated names
        ctx.minimum_version = ssl.TLSVersion.TLSv1
        ctx.maximum_version = getattr(ssl.TLSVersion, _SSL_VERSIONS[max_version])
    outcomes: list[str] = []
    first = trio.Event()

    async def handle(stream: trio.SocketStream) -> None:
        tls = trio.SSLStream(stream, ctx, server_side=True)
        try:
            await tls.do_handshake()
            outcomes.append(tls.version())
        except trio.BrokenResourceError:
            outcomes.append("failed")
        finally:
            first.set()
            await trio.aclose_forcefully(tls)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(functools.partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
        yield listeners[0].socket.getsockname()[1], outcomes, first
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("server_max, negotiated", [("1.1", "failed"), ("1.2", "TLSv1.2"), ("1.3", "TLSv1.3")])
async def test_grpc_negotiates_tls_1_2_or_1_3_and_nothing_older(certs, server_max, negotiated):
    """Why the gRPC exporter takes only min_version 1.2: grpcio's bounds are fixed at 1.2 and 1.3."""
    async with tls_handshake_probe(certs, server_max) as (port, outcomes, first):
        cfg = {"endpoint": f"127.0.0.1:{port}", "tls": {"insecure": False, "ca_file": certs.ca_pem}, "retry_on_failure": NO_RETRY}
        ex = Exporter("grpc", cfg)
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                await nursery.start(ex.component.run)
                await ex.send.send(log_batch(numbered(1, "s:")))
                await first.wait()
                await ex.send.aclose()
        assert outcomes[0] == negotiated, outcomes
        assert ex.failed() == 1  # the probe speaks no gRPC


def test_http_min_version_is_the_ssl_context_minimum():
    for version, want in (("1.2", ssl.TLSVersion.TLSv1_2), ("1.3", ssl.TLSVersion.TLSv1_3)):
        cfg = decode_dataclass(HttpExporterConfig, {"endpoint": "https://otel:4318", "tls": {"min_version": version}})
        assert client_ssl_context(cfg.tls).minimum_version == want


@pytest.mark.parametrize("min_version, delivered", [("1.2", True), ("1.3", False)])
async def test_http_min_version_refuses_an_older_server(certs, min_version, delivered):
    async with open_otlp_sink(tls=SinkTLS(certs.server_pem, certs.server_key, max_version="1.2")) as sink:
        tls = {"ca_file": certs.ca_pem, "min_version": min_version}
        async with running("http", sink, {"endpoint": sink.http_url("https"), "tls": tls, "retry_on_failure": NO_RETRY}) as ex:
            await ex.send.send(log_batch(numbered(3, "s:")))
        if delivered:
            assert sink.items() == 3 and ex.sent() == 3
        else:
            assert sink.items() == 0 and ex.failed(reason="connection_error") == 3


# ---------------------------------------------------------------- TLS files at validate time

#: the user "nobody": a root test run checks unreadable files as this user, since root reads everything
NOBODY = 65534


def tls_config(transport: str, tls: dict):
    cls, endpoint = (GrpcExporterConfig, "otel:4317") if transport == "grpc" else (HttpExporterConfig, "https://otel:4318")
    return decode_dataclass(cls, {"endpoint": endpoint, "tls": tls}, validate=False)


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_readable_tls_files_validate(transport, certs):
    tls = {"ca_file": certs.ca_pem, "cert_file": certs.client_pem, "key_file": certs.client_key}
    assert tls_config(transport, tls).validate() == []


@pytest.mark.parametrize("transport", ["grpc", "http"])
@pytest.mark.parametrize("key", ["ca_file", "cert_file", "key_file"])
def test_a_missing_tls_file_or_a_directory_is_a_config_problem(transport, key, certs, tmp_path):
    good = {"ca_file": certs.ca_pem, "cert_file": certs.client_pem, "key_file": certs.client_key}
    missing = str(tmp_path / "nope.pem")
    assert tls_config(transport, {**good, key: missing}).validate() == [f"tls.{key}: {missing} does not exist"]
    assert tls_config(transport, {**good, key: str(tmp_path)}).validate() == [f"tls.{key}: {tmp_path} is a directory, not a PEM file"]
    inside_a_file = f"{certs.ca_pem}/x.pem"
    assert tls_config(transport, {**good, key: inside_a_file}).validate() == [f"tls.{key}: {inside_a_file} cannot be read: Not a directory"]


def test_an_unreadable_tls_file_is_a_config_problem(tmp_path):
    if os.geteuid() != 0:
        secret = tmp_path / "key.pem"
        secret.write_text("not for you\n")
        secret.chmod(0)
        assert file_problem(str(secret)) == "cannot be read: Permission denied"
        return
    # root reads a mode-000 file: ask validate as nobody, in a child process
    with tempfile.TemporaryDirectory() as d:
        os.chmod(d, 0o755)
        secret = Path(d, "key.pem")
        secret.write_text("not for you\n")
        secret.chmod(0)
        code = (
            "from tapio.config import decode_dataclass\n"
            "from tapio.exporters.otlp._config import GrpcExporterConfig, HttpExporterConfig\n"
            "for cls, ep in ((GrpcExporterConfig, 'otel:4317'), (HttpExporterConfig, 'https://otel:4318')):\n"
            f"    print(decode_dataclass(cls, {{'endpoint': ep, 'tls': {{'ca_file': {str(secret)!r}}}}}, validate=False).validate())\n"
        )
        proc = subprocess.run([sys.executable, "-c", code], user=NOBODY, capture_output=True, text=True, timeout=60, cwd="/")
    assert proc.returncode == 0, proc.stderr
    want = str([f"tls.ca_file: {secret} cannot be read: Permission denied"])
    assert proc.stdout.splitlines() == [want, want], proc.stdout


def test_validate_does_not_open_a_pipe(tmp_path):
    fifo = tmp_path / "ca.pem"
    os.mkfifo(fifo)
    result: list = []
    t = threading.Thread(target=lambda: result.append(tls_config("http", {"ca_file": str(fifo)}).validate()), daemon=True)
    t.start()
    t.join(10)
    assert not t.is_alive(), "validate blocked opening a FIFO"
    assert result == [[]]
