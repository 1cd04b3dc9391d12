"""A local certificate authority: a CA and the certificates of a mesh's members.

For tests, `kvmesh up --secure` and compose's development CA (`kvmesh certs`), never for
production (use cert-manager or your own PKI there). Keys are ECDSA P-256 (fast handshakes).
A member's certificate names it in the subject Common Name (its identity, see
`kvmesh.security.identity`) and lists the hosts it is reached at as subject alternative names,
and is good for both ends of mutual TLS (server and client auth). Files are written atomically
(a temporary file, then rename), keys readable by the owner only, so rewriting them in place is
a rotation the running services pick up.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import secrets
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from kvmesh.security.identity import token_digest

CA_CERT = "ca.pem"
CA_KEY = "ca-key.pem"
DEFAULT_HOSTS = ("127.0.0.1", "localhost")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def write_atomically(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Writes `path` so that a reader sees the old or the new content, never half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@dataclass(frozen=True)
class CA:
    """A CA's certificate and key, in memory and on disk (`ca.pem`, `ca-key.pem`)."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    directory: Path

    @property
    def cert_path(self) -> Path:
        return self.directory / CA_CERT

    @classmethod
    def load(cls, directory: Path) -> CA:
        cert = x509.load_pem_x509_certificate((directory / CA_CERT).read_bytes())
        key = serialization.load_pem_private_key((directory / CA_KEY).read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{directory / CA_KEY}: not an EC key made by kvmesh certs")
        return cls(cert, key, directory)


def make_ca(directory: Path, name: str = "kvmesh development CA", days: int = 365) -> CA:
    """A new self-signed CA in `directory` (overwrites one there)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    write_atomically(directory / CA_KEY, _key_pem(key), 0o600)
    write_atomically(directory / CA_CERT, cert.public_bytes(serialization.Encoding.PEM))
    return CA(cert, key, directory)


@dataclass(frozen=True)
class Issued:
    """A certificate written by `issue`: where its files are and its serial number."""

    name: str
    cert: Path
    key: Path
    serial: int


def _san(hosts: Sequence[str]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    for host in hosts:
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            out.append(x509.DNSName(host))
    return out


def issue(ca: CA, name: str, directory: Path, *, hosts: Sequence[str] = DEFAULT_HOSTS, days: float = 30,
          not_before: dt.datetime | None = None, not_after: dt.datetime | None = None,
          stem: str | None = None, common_name: bool = True) -> Issued:
    """A certificate for identity `name` (subject CN), valid for `hosts`, signed by `ca`, written
    to `directory/<stem>.pem` and `<stem>-key.pem` (stem defaults to the name). `not_before` and
    `not_after` override the validity (tests make expired certificates with them).
    `common_name=False` leaves the CN out (subject O=kvmesh, OU=name): etcd's JSON gateway refuses
    client certificates with a CN once etcd's auth is on."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    start = not_before or now - dt.timedelta(minutes=5)
    end = not_after or now + dt.timedelta(days=days)
    serial = x509.random_serial_number()
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)] if common_name else
                                [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "kvmesh"),
                                 x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, name)]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=True, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False)
    )
    if hosts:
        builder = builder.add_extension(x509.SubjectAlternativeName(_san(hosts)), critical=False)
    cert = builder.sign(ca.key, hashes.SHA256())
    stem = stem or name
    cert_path, key_path = directory / f"{stem}.pem", directory / f"{stem}-key.pem"
    # Key first, then certificate: a reader between the two sees a mismatched pair, which the
    # services reject (keeping the previous pair) until the certificate lands.
    write_atomically(key_path, _key_pem(key), 0o600)
    write_atomically(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return Issued(name, cert_path, key_path, serial)


def new_token() -> tuple[str, str]:
    """A random bearer token and the SHA-256 digest a policy stores for it."""
    token = secrets.token_urlsafe(32)
    return token, token_digest(token)


def ensure_ca(directory: Path, name: str = "kvmesh development CA") -> CA:
    """The CA in `directory`, made there first if there is none (or it expires within a day)."""
    if (directory / CA_CERT).exists() and (directory / CA_KEY).exists():
        ca = CA.load(directory)
        if ca.cert.not_valid_after_utc > _now() + dt.timedelta(days=1):
            return ca
    return make_ca(directory, name)


def tls_flags(ca: CA, issued: Issued) -> list[str]:
    """The command-line flags that make a kvmesh process serve and dial with `issued` (mutual TLS)."""
    return ["--tls-cert", str(issued.cert), "--tls-key", str(issued.key), "--tls-ca", str(ca.cert_path)]
