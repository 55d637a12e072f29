"""The CA against the real `openssl` command: what openssl accepts is what peers will accept.

Every certificate, CRL and CSR here crosses a file and is judged by openssl, not by the code
that made it. Hostile CSRs come from the checklist in FAULTS-AND-ATTACKS.md (node identity).
"""

from __future__ import annotations

import base64
import os
import re
import secrets
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtensionOID, NameOID

from crv.base.errors import PkiError
from crv.service.pki import SKEW_MARGIN, CertificateAuthority, check_unnamed_csr, node_identity

EC_P256 = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1")


def openssl(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        ["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )
    if check and proc.returncode != 0:
        pytest.fail(f"openssl {' '.join(args)} failed ({proc.returncode}): {proc.stderr}")
    return proc


def make_csr(
    workdir: Path, subj: str = "/CN=web-0", *extra: str, newkey: Sequence[str] = EC_P256
) -> bytes:
    """A CSR made the way a node's agent (or an attacker with a shell) would make one."""
    stem = workdir / secrets.token_hex(4)
    openssl(
        "req", "-new", *newkey, "-nodes", "-subj", subj, *extra,
        "-keyout", f"{stem}.key", "-out", f"{stem}.csr", cwd=workdir,
    )  # fmt: skip
    return Path(f"{stem}.csr").read_bytes()


def write_cert(path: Path, cert: x509.Certificate) -> Path:
    path.write_bytes(cert.public_bytes(Encoding.PEM))
    return path


def output(proc: subprocess.CompletedProcess[str]) -> str:
    return proc.stdout + proc.stderr


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority.create_or_load(tmp_path / "ca")


def sign(ca: CertificateAuthority, csr: bytes, **kwargs: object) -> x509.Certificate:
    args: dict[str, object] = {"cluster": "demo", "node": "web-0", "roles": ["web"]}
    args.update(kwargs)
    return ca.sign_node_csr(csr, **args)  # type: ignore[arg-type]


# --- the CA's own files ---------------------------------------------------------------------


def test_ca_created_private_and_reloaded_identically(tmp_path: Path) -> None:
    old_umask = os.umask(0)  # the 0600 must come from the open() mode, not from the umask
    try:
        ca = CertificateAuthority.create_or_load(tmp_path / "ca", name="demo")
    finally:
        os.umask(old_umask)
    cadir = tmp_path / "ca"
    assert (cadir / "ca.key").stat().st_mode & 0o777 == 0o600
    assert cadir.stat().st_mode & 0o777 == 0o700
    assert {p.name for p in cadir.iterdir()} == {"ca.key", "ca.crt", ".ca.lock"}  # no temp left

    again = CertificateAuthority.create_or_load(cadir, name="demo")
    assert again.certificate_pem == ca.certificate_pem == (cadir / "ca.crt").read_bytes()
    openssl_fp = openssl("x509", "-in", "ca.crt", "-noout", "-fingerprint", "-sha256", cwd=cadir)
    assert ca.fingerprint_sha256 == openssl_fp.stdout.split("=")[1].strip().replace(":", "").lower()

    cert = ca.certificate
    assert cert.subject.rfc4514_string() == "CN=demo cluster CA"
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 1  # one level: cluster CAs
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign
    assert not ku.value.digital_signature
    cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    now = datetime.now(timezone.utc)
    back = now - SKEW_MARGIN  # back-dated (F14, tests/test_clock_skew.py)
    assert back - timedelta(minutes=1) < cert.not_valid_before_utc <= back
    assert cert.not_valid_after_utc - now > timedelta(days=3649)
    # x509_strict checks what RFC 5280 requires of a CA (critical basicConstraints, SKI, ...).
    openssl("verify", "-x509_strict", "-CAfile", "ca.crt", "ca.crt", cwd=cadir)
    assert openssl("pkey", "-in", "ca.key", "-noout", "-text", cwd=cadir).stdout.count("P-256") == 1


def test_concurrent_creation_yields_one_ca(tmp_path: Path) -> None:
    go = tmp_path / "go"
    script = textwrap.dedent(
        f"""
        import os, time
        from pathlib import Path
        from crv.service.pki import CertificateAuthority
        while not os.path.exists({str(go)!r}):
            time.sleep(0.001)
        ca = CertificateAuthority.create_or_load(Path({str(tmp_path / "ca")!r}))
        print(ca.fingerprint_sha256)
        """
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        for _ in range(8)
    ]
    time.sleep(1.0)  # let them all import and wait at the start line
    go.touch()
    fingerprints = {p.communicate(timeout=60)[0].strip() for p in procs}
    assert all(p.returncode == 0 for p in procs)
    assert fingerprints == {CertificateAuthority.create_or_load(tmp_path / "ca").fingerprint_sha256}


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660])
def test_key_readable_by_others_refused(tmp_path: Path, mode: int) -> None:
    CertificateAuthority.create_or_load(tmp_path / "ca")
    (tmp_path / "ca" / "ca.key").chmod(mode)
    with pytest.raises(PkiError, match=r"ca\.key: readable by group or others"):
        CertificateAuthority.create_or_load(tmp_path / "ca")


def test_key_of_another_ca_refused(tmp_path: Path) -> None:
    CertificateAuthority.create_or_load(tmp_path / "a")
    CertificateAuthority.create_or_load(tmp_path / "b")
    shutil.copyfile(tmp_path / "b" / "ca.key", tmp_path / "a" / "ca.key")
    with pytest.raises(PkiError, match=r"ca\.key: key does not match the certificate"):
        CertificateAuthority.create_or_load(tmp_path / "a")


@pytest.mark.parametrize(
    ("extensions", "why"),
    [
        ("", "no basicConstraints"),
        ("basicConstraints=critical,CA:FALSE\n", "basicConstraints CA:FALSE"),
    ],
)
def test_non_ca_certificate_refused(tmp_path: Path, extensions: str, why: str) -> None:
    cadir = tmp_path / "ca"
    CertificateAuthority.create_or_load(cadir)
    # Same key, but a plain self-signed certificate instead of a CA.
    (cadir / "ext.cnf").write_text(extensions)
    openssl("req", "-new", "-key", "ca.key", "-subj", "/CN=x", "-out", "x.csr", cwd=cadir)
    openssl(
        "x509", "-req", "-in", "x.csr", "-key", "ca.key", "-days", "1", "-extfile", "ext.cnf",
        "-out", "ca.crt", cwd=cadir,
    )  # fmt: skip
    with pytest.raises(PkiError, match=rf"ca\.crt: not a CA certificate \({why}\)"):
        CertificateAuthority.create_or_load(cadir)


@pytest.mark.parametrize(
    ("genpkey", "named"),
    [
        (("-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:secp521r1"), "secp521r1"),
        (("-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"), "RSAPrivateKey"),
        (("-algorithm", "ED25519"), "Ed25519PrivateKey"),
    ],
)
def test_ca_key_of_wrong_type_refused(tmp_path: Path, genpkey: Sequence[str], named: str) -> None:
    cadir = tmp_path / "ca"
    CertificateAuthority.create_or_load(cadir)
    openssl("genpkey", *genpkey, "-out", "ca.key", cwd=cadir)
    (cadir / "ca.key").chmod(0o600)
    with pytest.raises(PkiError, match=rf"ca\.key: CA key is {named}; EC P-256 or P-384"):
        CertificateAuthority.create_or_load(cadir)


def test_key_left_without_certificate_is_certified(tmp_path: Path) -> None:
    """A crash between publishing the key and the certificate must not leave a dead CA."""
    cadir = tmp_path / "ca"
    cadir.mkdir(mode=0o700)
    openssl(
        "genpkey",
        "-algorithm",
        "EC",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-out",
        "ca.key",
        cwd=cadir,
    )
    (cadir / "ca.key").chmod(0o600)
    CertificateAuthority.create_or_load(cadir)
    key_pub = openssl("pkey", "-in", "ca.key", "-pubout", cwd=cadir).stdout
    cert_pub = openssl("x509", "-in", "ca.crt", "-noout", "-pubkey", cwd=cadir).stdout
    assert key_pub == cert_pub

    (cadir / "ca.key").unlink()
    with pytest.raises(PkiError, match=r"ca\.key: cannot read the CA key"):
        CertificateAuthority.create_or_load(cadir)


# --- node certificates ----------------------------------------------------------------------


def test_openssl_csr_signed_verified_and_named(ca: CertificateAuthority, tmp_path: Path) -> None:
    csr = make_csr(tmp_path, "/CN=web-0")
    cert = sign(ca, csr, roles=["web", "db"], addresses=["10.0.0.5", "fd00::5"])
    write_cert(tmp_path / "node.crt", cert)
    shutil.copy(tmp_path / "ca" / "ca.crt", tmp_path)

    verified = openssl("verify", "-x509_strict", "-CAfile", "ca.crt", "node.crt", cwd=tmp_path)
    assert verified.stdout.strip() == "node.crt: OK"
    for purpose in ("sslclient", "sslserver"):
        openssl("verify", "-purpose", purpose, "-CAfile", "ca.crt", "node.crt", cwd=tmp_path)

    text = openssl("x509", "-in", "node.crt", "-noout", "-text", cwd=tmp_path).stdout
    assert "Subject: O = demo, OU = web, OU = db, CN = web-0" in text
    assert (
        "DNS:web-0, IP Address:10.0.0.5, IP Address:FD00:0:0:0:0:0:0:5, URI:crv://demo/node/web-0,"
        " URI:crv://demo/role/web, URI:crv://demo/role/db" in text
    )
    assert re.search(r"Basic Constraints: critical\s+CA:FALSE", text)
    assert re.search(r"Key Usage: critical\s+Digital Signature\n", text)
    assert "TLS Web Client Authentication, TLS Web Server Authentication" in text
    assert "Authority Key Identifier" in text and "Subject Key Identifier" in text
    assert "Signature Algorithm: ecdsa-with-SHA256" in text


def test_certificate_from_another_ca_fails_verification(tmp_path: Path) -> None:
    ca_a = CertificateAuthority.create_or_load(tmp_path / "a")
    CertificateAuthority.create_or_load(tmp_path / "b")
    write_cert(tmp_path / "node.crt", sign(ca_a, make_csr(tmp_path)))
    proc = openssl("verify", "-CAfile", "b/ca.crt", "node.crt", cwd=tmp_path, check=False)
    assert proc.returncode != 0
    assert "unable to get local issuer certificate" in output(proc)


@pytest.mark.parametrize(
    "newkey",
    [("-newkey", "rsa:2048"), ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:secp384r1")],
)
def test_other_strong_keys_accepted(
    ca: CertificateAuthority, tmp_path: Path, newkey: Sequence[str]
) -> None:
    write_cert(tmp_path / "node.crt", sign(ca, make_csr(tmp_path, newkey=newkey)))
    openssl("verify", "-x509_strict", "-CAfile", "ca/ca.crt", "node.crt", cwd=tmp_path)


def test_csr_without_cn_accepted(ca: CertificateAuthority, tmp_path: Path) -> None:
    cert = sign(ca, make_csr(tmp_path, "/O=whatever"))
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "web-0"


def test_certificate_built_from_template_not_from_csr(
    ca: CertificateAuthority, tmp_path: Path
) -> None:
    csr = make_csr(
        tmp_path, "/CN=web-0/O=other-cluster/OU=admin",
        "-addext", "subjectAltName=DNS:web-0,IP:10.0.0.5",
        "-addext", "keyUsage=critical,digitalSignature,keyEncipherment,dataEncipherment",
        "-addext", "extendedKeyUsage=clientAuth",
        "-addext", "1.2.3.4=ASN1:UTF8String:smuggled",
    )  # fmt: skip
    cert = sign(ca, csr, addresses=["10.0.0.5"])
    assert cert.subject.rfc4514_string() == "CN=web-0,OU=web,O=demo"
    assert {e.oid for e in cert.extensions} == {
        ExtensionOID.BASIC_CONSTRAINTS,
        ExtensionOID.KEY_USAGE,
        ExtensionOID.EXTENDED_KEY_USAGE,
        ExtensionOID.SUBJECT_ALTERNATIVE_NAME,
        ExtensionOID.SUBJECT_KEY_IDENTIFIER,
        ExtensionOID.AUTHORITY_KEY_IDENTIFIER,
    }
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature and not ku.key_encipherment and not ku.data_encipherment
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert len(list(eku)) == 2


def test_not_before_backdated_for_clock_skew(ca: CertificateAuthority, tmp_path: Path) -> None:
    """F14: a node whose clock runs 4 minutes behind still accepts its fresh certificate."""
    before = datetime.now(timezone.utc)
    cert = sign(ca, make_csr(tmp_path), ttl=timedelta(hours=2))
    assert cert.not_valid_before_utc <= before - timedelta(minutes=4)
    assert abs(cert.not_valid_after_utc - (before + timedelta(hours=2))) < timedelta(minutes=1)
    write_cert(tmp_path / "node.crt", cert)
    behind = str(int(time.time()) - 4 * 60)
    openssl("verify", "-attime", behind, "-CAfile", "ca/ca.crt", "node.crt", cwd=tmp_path)


def test_ttl_limited_to_a_week(ca: CertificateAuthority, tmp_path: Path) -> None:
    csr = make_csr(tmp_path)
    sign(ca, csr, ttl=timedelta(days=7))
    for ttl in (timedelta(days=7, seconds=1), timedelta(days=8), timedelta(0), timedelta(-1)):
        with pytest.raises(PkiError, match=r"ttl .* is not between 0 and 7 days"):
            sign(ca, csr, ttl=ttl)


def test_node_identity_round_trips(ca: CertificateAuthority, tmp_path: Path) -> None:
    cert = sign(ca, make_csr(tmp_path, "/CN=db-1"), node="db-1", roles=["db", "backup"])
    reread = x509.load_pem_x509_certificate(cert.public_bytes(Encoding.PEM))
    assert node_identity(reread) == ("demo", "db-1", ("db", "backup"))
    _, server = ca.issue_server_certificate(["localhost"])
    with pytest.raises(PkiError, match="no crv identity"):
        node_identity(server)


# --- hostile or broken CSRs -----------------------------------------------------------------

HOSTILE = {
    "CN of another node": (("/CN=web-1",), r"subject CN 'web-1' is not 'web-0'"),
    "CN of the CA": (("/CN=crv cluster CA",), r"subject CN 'crv cluster CA' is not 'web-0'"),
    "SAN of another node": (
        ("/CN=web-0", "-addext", "subjectAltName=DNS:web-0,DNS:web-1"),
        r"SAN DNSName 'web-1' not allowed",
    ),
    "SAN of the blackboard": (
        ("/CN=web-0", "-addext", "subjectAltName=DNS:blackboard"),
        r"SAN DNSName 'blackboard' not allowed",
    ),
    "wildcard SAN": (
        ("/CN=web-0", "-addext", "subjectAltName=DNS:*.demo"),
        r"SAN DNSName '\*\.demo' not allowed",
    ),
    "IP SAN not planned": (
        ("/CN=web-0", "-addext", "subjectAltName=DNS:web-0,IP:10.0.0.9"),
        r"SAN IPAddress IPv4Address\('10\.0\.0\.9'\) not allowed",
    ),
    "URI SAN": (
        ("/CN=web-0", "-addext", "subjectAltName=URI:crv://demo/role/admin"),
        r"SAN UniformResourceIdentifier 'crv://demo/role/admin' not allowed",
    ),
    "CA:TRUE": (
        ("/CN=web-0", "-addext", "basicConstraints=critical,CA:TRUE"),
        r"requests basicConstraints CA:TRUE",
    ),
    "path length": (
        ("/CN=web-0", "-addext", "basicConstraints=critical,CA:FALSE,pathlen:0"),
        r"not a readable PEM certificate request: path_length must be None",
    ),
    "keyCertSign": (
        ("/CN=web-0", "-addext", "keyUsage=critical,keyCertSign"),
        r"requests keyCertSign",
    ),
    "extra EKU": (
        ("/CN=web-0", "-addext", "extendedKeyUsage=clientAuth,codeSigning"),
        r"requests extended key usage 1\.3\.6\.1\.5\.5\.7\.3\.3",
    ),
    "SHA-1 signature": (("/CN=web-0", "-sha1"), r"signed with sha1; SHA-256 or stronger"),
    "control character in subject": (("/CN=web-0/OU=a\x01b",), r"control character in subject OU"),
}
WEAK_KEYS = {
    "RSA 1024": (("-newkey", "rsa:1024"), r"RSA key of 1024 bits; at least 2048"),
    "P-521": (
        ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:secp521r1"),
        r"EC key on curve secp521r1",
    ),
    "P-192": (
        ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime192v1"),
        r"EC key on curve secp192r1",
    ),
    "Ed25519": (("-newkey", "ed25519"), r"key type Ed25519PublicKey not allowed"),
}


@pytest.mark.parametrize(("args", "message"), HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_csr_refused(
    ca: CertificateAuthority, tmp_path: Path, args: Sequence[str], message: str
) -> None:
    csr = make_csr(tmp_path, *args)
    with pytest.raises(PkiError, match=r"^CSR for web-0: " + message) as refused:
        sign(ca, csr, addresses=["10.0.0.5"])
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize(("newkey", "message"), WEAK_KEYS.values(), ids=WEAK_KEYS.keys())
def test_weak_key_refused(
    ca: CertificateAuthority, tmp_path: Path, newkey: Sequence[str], message: str
) -> None:
    csr = make_csr(tmp_path, newkey=newkey)
    with pytest.raises(PkiError, match=r"^CSR for web-0: " + message):
        sign(ca, csr)


def test_corrupted_self_signature_refused(ca: CertificateAuthority, tmp_path: Path) -> None:
    """No proof of possession: someone replaying another node's public key in their CSR."""
    der = bytearray(x509.load_pem_x509_csr(make_csr(tmp_path)).public_bytes(Encoding.DER))
    der[-1] ^= 0x01  # last byte of the ECDSA signature's s
    body = "\n".join(textwrap.wrap(base64.b64encode(bytes(der)).decode(), 64))
    pem = f"-----BEGIN CERTIFICATE REQUEST-----\n{body}\n-----END CERTIFICATE REQUEST-----\n"
    (tmp_path / "bad.csr").write_text(pem)
    # openssl 3.0 exits 0 here, so read what it says.
    judged = openssl("req", "-in", "bad.csr", "-verify", "-noout", cwd=tmp_path, check=False)
    assert "self-signature verify failure" in output(judged)
    with pytest.raises(PkiError, match=r"^CSR for web-0: bad self-signature"):
        sign(ca, pem.encode())


@pytest.mark.parametrize(
    "garbage",
    [
        b"",
        b"\x00\xff garbage \x01",
        b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
        b"-----BEGIN CERTIFICATE REQUEST-----\n" + b"A" * 20000,
    ],
    ids=["empty", "binary", "bad-der", "oversized"],
)
def test_garbage_refused(ca: CertificateAuthority, garbage: bytes) -> None:
    with pytest.raises(PkiError, match=r"^CSR for web-0: ") as refused:
        sign(ca, garbage)
    assert "\n" not in str(refused.value)


def test_certificate_pem_instead_of_csr_refused(ca: CertificateAuthority) -> None:
    with pytest.raises(PkiError, match="not a readable PEM certificate request"):
        sign(ca, ca.certificate_pem)


# --- duplicates: cryptography's builder refuses them, so the DER is put together here ------------


def _tlv(tag: int, body: bytes) -> bytes:
    if len(body) < 0x80:
        return bytes([tag, len(body)]) + body
    size = len(body).to_bytes((len(body).bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(size)]) + size + body


def _inside(der: bytes) -> list[bytes]:
    """The TLVs inside one constructed TLV (a SEQUENCE, SET or [0])."""
    i = 2 + (der[1] & 0x7F if der[1] & 0x80 else 0)
    found = []
    while i < len(der):
        start, size, i = i, der[i + 1], i + 2
        if size & 0x80:
            size, i = int.from_bytes(der[i : i + (size & 0x7F)], "big"), i + (size & 0x7F)
        i += size
        found.append(der[start:i])
    return found


def _pem_csr(info: bytes, key: ec.EllipticCurvePrivateKey, algorithm: bytes) -> bytes:
    """CertificationRequest {info, algorithm, signature}, signed by `key`: only the duplicate is
    wrong with it (openssl verifies its self-signature)."""
    signature = key.sign(info, ec.ECDSA(hashes.SHA256()))
    der = _tlv(0x30, info + algorithm + _tlv(0x03, b"\x00" + signature))
    body = "\n".join(textwrap.wrap(base64.b64encode(der).decode(), 64))
    return (
        f"-----BEGIN CERTIFICATE REQUEST-----\n{body}\n-----END CERTIFICATE REQUEST-----\n".encode()
    )


def _builder(cn: str | None) -> x509.CertificateSigningRequestBuilder:
    names = [x509.NameAttribute(NameOID.COMMON_NAME, cn)] if cn else []
    return x509.CertificateSigningRequestBuilder().subject_name(x509.Name(names))


def csr_with_extension_twice(
    first: x509.ExtensionType, second: x509.ExtensionType, cn: str | None = "web-0"
) -> bytes:
    """One extensionRequest holding `first` and then `second`, two extensions of one type: the
    second is built under a stand-in OID of the same length (2.5.29.99), then renamed."""
    key = ec.generate_private_key(ec.SECP256R1())
    stand_in = x509.ObjectIdentifier("2.5.29.99")
    csr = (
        _builder(cn)
        .add_extension(first, critical=False)
        .add_extension(x509.UnrecognizedExtension(stand_in, second.public_bytes()), critical=False)
        .sign(key, hashes.SHA256())
    )
    info, algorithm, _ = _inside(csr.public_bytes(Encoding.DER))
    arc = int(first.oid.dotted_string.removeprefix("2.5.29."))
    assert info.count(bytes.fromhex("0603551d63")) == 1 and arc < 0x80
    info = info.replace(bytes.fromhex("0603551d63"), bytes.fromhex("0603551d") + bytes([arc]))
    return _pem_csr(info, key, algorithm)


def csr_with_two_extension_requests(
    first: x509.ExtensionType, second: x509.ExtensionType, *, der_order: bool = True
) -> bytes:
    """Two extensionRequest attributes, `first` in one and `second` in the other: in DER's
    order for a SET OF (by encoding), or not."""
    key = ec.generate_private_key(ec.SECP256R1())
    made = [
        _inside(_builder("web-0").add_extension(ext, critical=False).sign(key, hashes.SHA256())
                .public_bytes(Encoding.DER))
        for ext in (first, second)
    ]  # fmt: skip
    version, subject, spki, _ = _inside(made[0][0])
    attributes = [_inside(_inside(info)[3])[0] for info, _, _ in made]
    if der_order == (attributes[0] > attributes[1]):
        attributes.reverse()
    info = _tlv(0x30, version + subject + spki + _tlv(0xA0, b"".join(attributes)))
    return _pem_csr(info, key, made[0][1])


SAN_WEB_0 = x509.SubjectAlternativeName([x509.DNSName("web-0")])
SAN_WEB_1 = x509.SubjectAlternativeName([x509.DNSName("web-1")])
NOT_CA = x509.BasicConstraints(ca=False, path_length=None)
CA = x509.BasicConstraints(ca=True, path_length=None)
CLIENT = x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH])
CODE_SIGNING = x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.CODE_SIGNING])
TWICE = {
    "subjectAltName": (SAN_WEB_0, SAN_WEB_1, "2.5.29.17", "DNS:web-1"),
    "basicConstraints": (NOT_CA, CA, "2.5.29.19", "CA:TRUE"),
    "extendedKeyUsage": (CLIENT, CODE_SIGNING, "2.5.29.37", "Code Signing"),
}


@pytest.mark.parametrize(("first", "second", "oid", "seen"), TWICE.values(), ids=TWICE.keys())
def test_csr_with_an_extension_twice_refused(
    ca: CertificateAuthority,
    tmp_path: Path,
    first: x509.ExtensionType,
    second: x509.ExtensionType,
    oid: str,
    seen: str,
) -> None:
    """The first is harmless, the second is what a check reading only the first would let in."""
    pem = csr_with_extension_twice(first, second)
    (tmp_path / "twice.csr").write_bytes(pem)
    shown = output(openssl("req", "-in", "twice.csr", "-verify", "-noout", "-text", cwd=tmp_path))
    assert "self-signature verify OK" in shown and seen in shown  # well-formed but for that
    with pytest.raises(PkiError) as refused:
        sign(ca, pem, addresses=["10.0.0.5"])
    assert str(refused.value) == f"CSR for web-0: duplicate extension {oid}"
    assert refused.value.__cause__ is None and refused.value.__suppress_context__
    # a pairing machine's CSR (no names) is judged the same way
    with pytest.raises(PkiError) as refused:
        check_unnamed_csr(csr_with_extension_twice(first, second, cn=None))
    assert str(refused.value) == f"CSR for a pairing machine: duplicate extension {oid}"


@pytest.mark.parametrize("second", [SAN_WEB_1, CA], ids=["san", "ca"])
def test_csr_with_two_extension_requests_refused(
    ca: CertificateAuthority, tmp_path: Path, second: x509.ExtensionType
) -> None:
    """openssl and cryptography read the first extensionRequest attribute and ignore the rest, so
    no check would see the second: the CSR is refused rather than signed unread."""
    pem = csr_with_two_extension_requests(SAN_WEB_0, second)
    (tmp_path / "two.csr").write_bytes(pem)
    shown = output(openssl("req", "-in", "two.csr", "-verify", "-noout", "-text", cwd=tmp_path))
    assert "self-signature verify OK" in shown and shown.count("X509v3 ") == 1  # one of two
    assert len(x509.load_pem_x509_csr(pem).attributes) == 2
    with pytest.raises(PkiError) as refused:
        sign(ca, pem, addresses=["10.0.0.5"])
    assert str(refused.value) == "CSR for web-0: 2 extensionRequest attributes; one at most"
    # out of DER order the attributes cannot be read at all: refused too, not signed unread
    pem = csr_with_two_extension_requests(SAN_WEB_0, second, der_order=False)
    with pytest.raises(PkiError) as refused:
        sign(ca, pem, addresses=["10.0.0.5"])
    assert str(refused.value).startswith(
        "CSR for web-0: not a readable PEM certificate request: error parsing asn1 value: "
    )
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"cluster": "Demo"}, r"bad cluster name 'Demo'"),
        ({"cluster": "../x"}, r"bad cluster name '\.\./x'"),
        ({"node": "web-0\n"}, r"bad node name 'web-0\\n'"),
        ({"node": "-web"}, r"bad node name '-web'"),
        ({"node": "w" * 64}, r"bad node name 'w{64}'"),
        ({"roles": ["web", "a\x00b"]}, r"bad role name 'a\\x00b'"),
        ({"roles": ["web/../admin"]}, r"bad role name 'web/\.\./admin'"),
        ({"roles": "web"}, r"roles must be a list of names"),
        ({"roles": ["web", "web"]}, r"duplicate role"),
        ({"addresses": ["10.0.0.300"]}, r"bad IP address '10\.0\.0\.300'"),
    ],
)
def test_bad_names_refused(
    ca: CertificateAuthority, tmp_path: Path, kwargs: dict[str, object], message: str
) -> None:
    csr = make_csr(tmp_path)
    with pytest.raises(PkiError, match=message) as refused:
        sign(ca, csr, **kwargs)
    assert "\n" not in str(refused.value) and "\x00" not in str(refused.value)


# --- the service's own certificate ----------------------------------------------------------


def test_server_certificate_serves_but_cannot_be_a_client(
    ca: CertificateAuthority, tmp_path: Path
) -> None:
    key_pem, cert = ca.issue_server_certificate(["localhost", "crv.example.org"], ["127.0.0.1"])
    (tmp_path / "server.key").write_bytes(key_pem)
    write_cert(tmp_path / "server.crt", cert)
    shutil.copy(tmp_path / "ca" / "ca.crt", tmp_path)

    key_pub = openssl("pkey", "-in", "server.key", "-pubout", cwd=tmp_path).stdout
    assert key_pub == openssl("x509", "-in", "server.crt", "-noout", "-pubkey", cwd=tmp_path).stdout
    openssl(
        "verify",
        "-x509_strict",
        "-purpose",
        "sslserver",
        "-CAfile",
        "ca.crt",
        "server.crt",
        cwd=tmp_path,
    )
    client = openssl(
        "verify",
        "-purpose",
        "sslclient",
        "-CAfile",
        "ca.crt",
        "server.crt",
        cwd=tmp_path,
        check=False,
    )
    assert client.returncode != 0
    assert "unsuitable certificate purpose" in output(client)
    text = openssl("x509", "-in", "server.crt", "-noout", "-text", cwd=tmp_path).stdout
    assert "DNS:localhost, DNS:crv.example.org, IP Address:127.0.0.1" in text


@pytest.mark.parametrize("hostnames", [["*.example.org"], ["Localhost"], ["a..b"], "localhost", []])
def test_server_certificate_bad_hostnames_refused(
    ca: CertificateAuthority, hostnames: Sequence[str]
) -> None:
    with pytest.raises(PkiError):
        ca.issue_server_certificate(hostnames)


# --- revocation ------------------------------------------------------------------------------


def test_crl_revokes_one_certificate_and_not_the_other(
    ca: CertificateAuthority, tmp_path: Path
) -> None:
    revoked = write_cert(tmp_path / "revoked.crt", sign(ca, make_csr(tmp_path)))
    kept = write_cert(
        tmp_path / "kept.crt", sign(ca, make_csr(tmp_path, "/CN=web-1"), node="web-1")
    )
    serial = x509.load_pem_x509_certificate(revoked.read_bytes()).serial_number
    crl = ca.build_crl([(serial, datetime.now(timezone.utc))], crl_number=7)
    (tmp_path / "crl.pem").write_bytes(crl.public_bytes(Encoding.PEM))
    shutil.copy(tmp_path / "ca" / "ca.crt", tmp_path)

    checked = openssl("crl", "-in", "crl.pem", "-CAfile", "ca.crt", "-noout", cwd=tmp_path)
    assert "verify OK" in output(checked)
    text = openssl("crl", "-in", "crl.pem", "-noout", "-text", cwd=tmp_path).stdout
    assert re.search(r"X509v3 CRL Number:\s+7\n", text)
    assert "X509v3 Authority Key Identifier" in text
    assert [int(s, 16) for s in re.findall(r"Serial Number: ([0-9A-F]+)", text)] == [serial]

    crl_check = ("verify", "-crl_check", "-CRLfile", "crl.pem", "-CAfile", "ca.crt")
    refused = openssl(*crl_check, revoked.name, cwd=tmp_path, check=False)
    assert refused.returncode != 0
    assert "certificate revoked" in output(refused)
    assert openssl(*crl_check, kept.name, cwd=tmp_path).stdout.strip() == "kept.crt: OK"
    # F14: the CRL is back-dated too, so a peer 4 minutes behind still uses it.
    behind = str(int(time.time()) - 4 * 60)
    openssl(*crl_check, "-attime", behind, kept.name, cwd=tmp_path)


def test_crl_of_another_ca_fails_verification(tmp_path: Path) -> None:
    CertificateAuthority.create_or_load(tmp_path / "a")
    other = CertificateAuthority.create_or_load(tmp_path / "b")
    (tmp_path / "crl.pem").write_bytes(other.build_crl([], crl_number=1).public_bytes(Encoding.PEM))
    proc = openssl(
        "crl", "-in", "crl.pem", "-CAfile", "a/ca.crt", "-noout", cwd=tmp_path, check=False
    )
    # openssl 3.0 exits 0 either way; what it prints is the verdict.
    assert "verify failure" in output(proc) and "verify OK" not in output(proc)


def test_crl_needs_timezone_aware_times(ca: CertificateAuthority) -> None:
    with pytest.raises(PkiError, match="has no timezone"):
        ca.build_crl([(1, datetime.now())], crl_number=1)
