"""CA throughput: node certificates per second from `sign_node_csr` (target: thousands/s).

CSRs are made beforehand, as nodes make them on their own machines; only the CA's work is
timed: parsing and checking the CSR (including its self-signature) and signing the certificate.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from benchmarks import exit_on_sigterm
from crv.service.pki import CertificateAuthority

COUNT = 2000


def _csr(node: str) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node)])
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(subject)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(node)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_pki")
    parser.add_argument("--smoke", action="store_true", help="20 certificates (CI)")
    args, _ = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    count = 20 if args.smoke else COUNT
    with tempfile.TemporaryDirectory() as directory:
        ca = CertificateAuthority.create_or_load(Path(directory) / "ca")
        requests = [(f"node-{i}", _csr(f"node-{i}")) for i in range(count)]
        roles = ["worker", "monitor"]
        start = time.perf_counter()
        for i, (node, pem) in enumerate(requests):
            address = f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}"
            ca.sign_node_csr(pem, cluster="bench", node=node, roles=roles, addresses=[address])
        elapsed = time.perf_counter() - start
    print(
        f"pki: signed {count} node certificates in {elapsed:.2f} s = {count / elapsed:.0f}/s "
        "(target: thousands/s)"
    )


if __name__ == "__main__":
    exit_on_sigterm()
    main()
