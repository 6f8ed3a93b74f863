"""`fedmoe certs`: a development CA and a server certificate for the coordinator's hosts.

For trying fedmoe across machines (or on loopback) without a PKI. In production the operator
brings their own CA and certificate; the coordinator only needs the three PEM files. The server
certificate serves both the agents' endpoint and the admin API, so it names every host either is
reached by; `localhost`, 127.0.0.1 and ::1 are always included.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")
FILES = ("ca.pem", "ca.key", "server.pem", "server.key")


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedmoe development"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _alt_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _write(path: Path, data: bytes, private: bool) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def make_dev_certificates(
    out: Path, hosts: list[str], days: int = 365, force: bool = False
) -> list[Path]:
    """Write ca.pem, ca.key, server.pem, server.key into `out`; returns their paths."""
    for host in hosts:
        if not host or len(host) > 253 or any(c.isspace() for c in host):
            raise ValueError(f"--host {host!r}: not a host name or IP address")
    if not 1 <= days <= 3650:
        raise ValueError(f"--days must be in [1, 3650], got {days}")
    paths = [out / name for name in FILES]
    if not force and (existing := [p for p in paths if p.exists()]):
        raise FileExistsError(
            f"{existing[0]} exists; pass --force to replace the certificates in {out}"
        )
    out.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("fedmoe development CA"))
        .issuer_name(_name("fedmoe development CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )  # key_cert_sign, crl_sign
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    names = list(dict.fromkeys([*hosts, *DEFAULT_HOSTS]))
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = (
        x509.CertificateBuilder()
        .subject_name(_name(names[0]))
        .issuer_name(ca.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([_alt_name(h) for h in names]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    _write(paths[0], ca.public_bytes(serialization.Encoding.PEM), private=False)
    _write(paths[1], _key_pem(ca_key), private=True)
    _write(paths[2], server.public_bytes(serialization.Encoding.PEM), private=False)
    _write(paths[3], _key_pem(server_key), private=True)
    return paths
