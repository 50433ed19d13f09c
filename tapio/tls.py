"""Client-side TLS for the components that connect out over HTTPS (otlphttp, etcd-watch).

Each component keeps its own ``tls`` config dataclass (its docs and the
versions it accepts differ); what they share is read here by attribute:
``ca_file``, ``cert_file``, ``key_file``, ``insecure_skip_verify`` and
``min_version``.

Invariants:
- `client_tls_problems` reports every problem at validate time, each
  prefixed with its dotted key; `client_ssl_context` raises OSError naming
  the file that cannot be loaded at start.
- `file_problem` never blocks and never consumes: only regular files are
  opened (and closed unread).
"""

from __future__ import annotations

import os
import ssl
import stat
from typing import Any, Iterable

SSL_VERSIONS = {
    "1.0": ssl.TLSVersion.TLSv1,
    "1.1": ssl.TLSVersion.TLSv1_1,
    "1.2": ssl.TLSVersion.TLSv1_2,
    "1.3": ssl.TLSVersion.TLSv1_3,
}


def file_problem(path: str) -> str | None:
    """Why the file at ``path`` could not be read at start (``"does not exist"`` …), or None.

    Side-effect free: a regular file is opened for reading and closed, nothing
    is read; anything that is neither a regular file nor a directory (a pipe,
    a device) is not opened, since opening it could block or consume.
    Relative paths are relative to the working directory, as at start.
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "does not exist"
    except OSError as exc:
        return f"cannot be read: {exc.strerror or exc}"
    if stat.S_ISDIR(mode):
        return "is a directory, not a PEM file"
    if not stat.S_ISREG(mode):
        return None
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        return f"cannot be read: {exc.strerror or exc}"
    return None


def client_tls_problems(tls: Any, prefix: str, versions: Iterable[str]) -> list[str]:
    """The problems of a client ``tls`` section: unreadable files, a half mutual-TLS pair, an unknown version."""
    problems: list[str] = []
    for key in ("ca_file", "cert_file", "key_file"):
        path = getattr(tls, key)
        trouble = file_problem(path) if path else None
        if trouble:
            problems.append(f"{prefix}.{key}: {path} {trouble}")
    if bool(tls.cert_file) != bool(tls.key_file):
        missing = "key_file" if tls.cert_file else "cert_file"
        problems.append(f"{prefix}.{missing}: cert_file and key_file must be given together for mutual TLS")
    versions = tuple(versions)
    if tls.min_version not in versions:
        problems.append(f"{prefix}.min_version: must be one of {', '.join(versions)}, got {tls.min_version!r}")
    return problems


def client_ssl_context(tls: Any) -> ssl.SSLContext:
    """The client TLS context of a ``tls`` section. Raises OSError naming an unreadable or invalid file."""
    try:
        ctx = ssl.create_default_context(cafile=tls.ca_file or None)
    except (OSError, ssl.SSLError) as exc:
        raise OSError(f"cannot load tls.ca_file {tls.ca_file}: {exc}") from exc
    if tls.insecure_skip_verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if tls.cert_file:
        try:
            ctx.load_cert_chain(tls.cert_file, tls.key_file)
        except (OSError, ssl.SSLError) as exc:
            raise OSError(f"cannot load tls.cert_file {tls.cert_file} / tls.key_file {tls.key_file}: {exc}") from exc
    ctx.minimum_version = SSL_VERSIONS[tls.min_version]
    return ctx
