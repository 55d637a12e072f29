"""Runs the service: uvicorn over HTTPS with optional client certificates, verified by the CA.

uvicorn does not hand the client certificate to the application, so a small protocol subclass
puts the verified peer certificate (DER) into each request's state; routes then authorize by it.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import socket
import ssl
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import uvicorn
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from crv.errors import PkiError
from crv.home import Home
from crv.pki import CertificateAuthority, node_ttl_from_env
from crv.service.app import create_app
from crv.store import Store, open_engine


class TlsPeerHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn does not pass the client certificate to the app: each connection puts the
    verified peer certificate (DER) into its requests' state."""

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        ssl_object = transport.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        # per connection: the shared app_state dict is copied, not mutated
        self.app_state = {**self.app_state, "tls_peer_cert": der}


def _write_private(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _still_valid(cert_path: Path, margin: timedelta = timedelta(days=7)) -> bool:
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except (OSError, ValueError):
        return False
    return cert.not_valid_after_utc > datetime.now(timezone.utc) + margin


def _names(cert_path: Path, address: str) -> bool:
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, x509.ExtensionNotFound):
        return False
    return ipaddress.ip_address(address) in san.get_values_for_type(x509.IPAddress)


def ensure_credentials(home: Home, ca: CertificateAuthority) -> tuple[Path, Path]:
    """The server's TLS pair and the admin client pair, renewed when near expiry. The server
    certificate names localhost, 127.0.0.1 and this host, which is what agents dial, and the
    address in CRV_SERVICE_ADDRESS (where real machines reach the service), if set."""
    home.ensure()
    server_crt, server_key = home.service_dir / "server.crt", home.service_dir / "server.key"
    extra = os.environ.get("CRV_SERVICE_ADDRESS", "").strip()
    if not _still_valid(server_crt) or (extra and not _names(server_crt, extra)):
        addresses = ["127.0.0.1", "::1", *([extra] if extra else [])]
        try:  # the host name too, when it is a valid DNS name
            key_pem, cert = ca.issue_server_certificate(
                ["localhost", socket.gethostname().lower()], addresses
            )
        except PkiError:
            key_pem, cert = ca.issue_server_certificate(["localhost"], addresses)
        _write_private(server_key, key_pem)
        server_crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if not _still_valid(home.admin_cert):
        key_pem, cert = ca.issue_admin_certificate()
        _write_private(home.admin_key, key_pem)
        home.admin_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return server_crt, server_key


def ssl_context(home: Home, server_crt: Path, server_key: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(server_crt, server_key)
    ctx.load_verify_locations(home.ca_file)
    ctx.verify_mode = ssl.CERT_OPTIONAL  # enrolment has no certificate yet; routes decide
    return ctx


def serve(home: Home, host: str, port: int) -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    ca = CertificateAuthority.create_or_load(home.ca_dir)
    server_crt, server_key = ensure_credentials(home, ca)
    store = Store(open_engine(home.database))
    config = uvicorn.Config(
        create_app(store, ca, node_ttl=node_ttl_from_env()),
        host=host,
        port=port,
        http=TlsPeerHttpToolsProtocol,
        loop="uvloop",
        log_level="warning",
        timeout_keep_alive=60,
        ssl_certfile=str(server_crt),  # makes uvicorn report https; the context is ours
        ssl_keyfile=str(server_key),
    )
    config.load()
    config.ssl = ssl_context(home, server_crt, server_key)
    uvicorn.Server(config).run()
