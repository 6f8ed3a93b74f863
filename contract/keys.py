"""Node identity: the public-key format both sides agree on.

An enterprise node authenticates to Flower's SuperLink with an EC key pair on a NIST curve (what
Flower's SuperNode authentication accepts), exchanged in OpenSSH format: `fedmoe agent init`
writes it, the admin registers the public key, and both print the same SHA256 fingerprint that
`ssh-keygen -lf` would.
"""

from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

NIST_CURVES = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)
MAX_PUBLIC_KEY_CHARS = 4096


def load_public_key(text: str) -> ec.EllipticCurvePublicKey:
    """An OpenSSH public key line (`ecdsa-sha2-nistp384 AAAA... comment`); ValueError otherwise."""
    if not text or len(text) > MAX_PUBLIC_KEY_CHARS:
        raise ValueError(
            "public_key: expected one OpenSSH public key line (`fedmoe agent init` prints it)"
        )
    if any(ord(c) < 32 and c not in "\t\r\n" or ord(c) == 127 for c in text):
        # A NUL would be cut by SQLite and refused by PostgreSQL: refused here, named.
        raise ValueError("public_key: must not contain control characters (NUL, escape, ...)")
    try:
        key = serialization.load_ssh_public_key(text.strip().encode())
    except (ValueError, TypeError, UnicodeError) as err:
        raise ValueError(f"public_key: not an OpenSSH public key ({err})") from None
    except Exception as err:  # noqa: BLE001 - unsupported key types raise their own kinds
        raise ValueError(f"public_key: not a usable key ({type(err).__name__})") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, NIST_CURVES):
        raise ValueError(
            "public_key: must be an ECDSA key on a NIST curve (P-256, P-384 or P-521); make one with `fedmoe agent init`"
        )
    return key


def openssh_public(key: ec.EllipticCurvePublicKey) -> str:
    return key.public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    ).decode()


def fingerprint(key: ec.EllipticCurvePublicKey) -> str:
    """`SHA256:<base64>`, as `ssh-keygen -lf` prints it."""
    blob = base64.b64decode(openssh_public(key).split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def write_key_pair(private_path: Path, public_path: Path) -> str:
    """A new P-384 key pair: the private key (mode 0600, OpenSSH format) and its public line;
    returns the public line."""
    key = ec.generate_private_key(ec.SECP384R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    private_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    line = openssh_public(key.public_key())
    public_path.write_text(line + " fedmoe-node\n")
    return line
