"""TLS and mutual TLS of both exporters against the reference sink, with a CA and certificates made here."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import trio

from tapio.pdata import Signal
from tapio.testing.otlpsink import SinkTLS, open_otlp_sink

from .test_otlp_exporter import Exporter, log_batch, running

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
    if shutil.which("openssl") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("the openssl command is needed to make test certificates (apt-get install openssl)")
        pytest.skip("openssl is not installed: cannot make test certificates")
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
            await ex.send.send(log_batch(0, 3))
        assert sink.items() == 3 and ex.sent() == 3


@pytest.mark.parametrize("transport", ["grpc", "http"])
async def test_tls_refuses_a_server_signed_by_an_untrusted_ca(transport, certs):
    async with tls_sink(certs, mutual=False) as sink:
        cfg = {"endpoint": endpoint(transport, sink), "tls": {"insecure": False, "ca_file": certs.other_pem}, "retry_on_failure": NO_RETRY}
        async with running(transport, sink, cfg) as ex:
            await ex.send.send(log_batch(0, 3))
        assert sink.items() == 0 and ex.failed(reason="unavailable" if transport == "grpc" else "connection_error") == 3


async def test_http_insecure_skip_verify_accepts_any_certificate(certs):
    async with tls_sink(certs, mutual=False) as sink:
        cfg = {"endpoint": sink.http_url("https"), "tls": {"insecure_skip_verify": True, "min_version": "1.3"}}
        async with running("http", sink, cfg) as ex:
            await ex.send.send(log_batch(0, 2))
        assert sink.items() == 2 and ex.sent() == 2


@pytest.mark.parametrize("transport", ["grpc", "http"])
async def test_mutual_tls(transport, certs):
    async with tls_sink(certs, mutual=True) as sink:
        tls = {"insecure": False, "ca_file": certs.ca_pem, "cert_file": certs.client_pem, "key_file": certs.client_key}
        async with running(transport, sink, {"endpoint": endpoint(transport, sink), "tls": tls}) as ex:
            await ex.send.send(log_batch(0, 4))
        assert sink.items() == 4 and ex.sent() == 4

        # without a client certificate the server refuses the handshake
        cfg = {"endpoint": endpoint(transport, sink), "tls": {"insecure": False, "ca_file": certs.ca_pem}, "retry_on_failure": NO_RETRY}
        async with running(transport, sink, cfg) as ex:
            await ex.send.send(log_batch(0, 4))
        assert sink.items() == 4 and ex.failed() == 4


@pytest.mark.parametrize("transport", ["grpc", "http"])
async def test_unreadable_tls_files_fail_at_start_naming_the_file(transport, certs, tmp_path):
    missing = str(tmp_path / "nope.pem")
    async with open_otlp_sink() as sink:
        ex = Exporter(transport, {"endpoint": endpoint(transport, sink), "tls": {"insecure": False, "ca_file": missing}})
        with pytest.raises(OSError, match="nope.pem"):
            with trio.fail_after(10):
                await ex.component.run()
    assert Signal.LOGS  # the exporter never started: nothing to count
