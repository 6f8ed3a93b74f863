"""What fedmoe adds to Flower's SecAgg+ messages: signed keys, a session, a consistency round.

Flower 1.42's SecAgg+ trusts the coordinator with the peer list: it relays every node's public
keys and names the survivors before unmasking, and a coordinator that fakes peers, or lists a
node both as survivor and as dropped, can unmask one node's update alone. Bonawitz et al. 2017
(CCS, "Practical Secure Aggregation", round 4 ConsistencyCheck) close that with signatures from
identities the nodes can verify. Here, on top of Flower's own stages (its messages keep their
keys; ours travel beside them and a node strips them before Flower's mod reads the rest):

- setup reply: the node's identity (its OpenSSH public key, the one registered with the
  coordinator) and its signature over (node id, pk1, pk2);
- share-keys request: beside each peer's keys, that peer's identity and signature (`PEER`);
- consistency (our own stage, after the masked vectors): the coordinator names the survivors,
  each survivor signs (session, survivors) once;
- unmask request: those signatures, which a node checks before it reveals any share.

A session is the set of (node id, identity, pk1, pk2) a node joined, and its threshold: two
sessions never share keys, so a release bound to one session is never summed in another.
This module holds only the wire format and the byte strings that are signed, for both sides.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedmoe.contract.keys import fingerprint, load_public_key

IDENTITY = "fedmoe.identity"  # setup reply: the node's OpenSSH public key line (bytes)
KEY_SIGNATURE = "fedmoe.key-signature"  # setup reply: signature over key_transcript
PEER = "fedmoe.peer."  # share-keys request: PEER + node id -> [identity, key signature]
CONSISTENCY = "fedmoe.consistency"  # the stage name of the consistency round
SURVIVORS = "fedmoe.survivors"  # consistency request: the survivors' node ids
SURVIVOR_SIGNATURE = "fedmoe.survivor-signature"  # consistency reply
SIGNERS = "fedmoe.signers"  # unmask request: node ids of the signers ...
SIGNATURES = "fedmoe.signatures"  # ... and their survivor signatures, in the same order

_KEYS_DOMAIN = b"fedmoe secagg+ keys v1"
_SESSION_DOMAIN = b"fedmoe secagg+ session v1"
_SURVIVORS_DOMAIN = b"fedmoe secagg+ survivors v1"
_SIGNATURE = ec.ECDSA(hashes.SHA256())


def _field(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def key_transcript(node_id: int, pk1: bytes, pk2: bytes) -> bytes:
    """What a node signs at setup: its SecAgg+ public keys, under its node id."""
    return _KEYS_DOMAIN + struct.pack(">Q", node_id) + _field(pk1) + _field(pk2)


def session_id(threshold: int, members: Iterable[tuple[int, bytes, bytes, bytes]]) -> bytes:
    """The session of (node id, identity, pk1, pk2) members unmasking sums of >= threshold."""
    h = hashlib.sha256(_SESSION_DOMAIN + struct.pack(">Q", threshold))
    for node_id, identity, pk1, pk2 in sorted(members):
        h.update(struct.pack(">Q", node_id) + _field(identity) + _field(pk1) + _field(pk2))
    return h.digest()


def survivors_transcript(session: bytes, survivors: Iterable[int]) -> bytes:
    """What a survivor signs in the consistency round: these, and only these, are in the sum."""
    ids = sorted(set(survivors))
    return _SURVIVORS_DOMAIN + _field(session) + b"".join(struct.pack(">Q", i) for i in ids)


class Identity:
    """A node's signing identity: its EC key (the one Flower's node authentication uses)."""

    def __init__(self, private_key: ec.EllipticCurvePrivateKey):
        self._key = private_key
        self.public_line = (
            private_key.public_key()
            .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
            .decode()
        )
        self.fingerprint = fingerprint(private_key.public_key())

    @classmethod
    def generate(cls) -> Identity:
        return cls(ec.generate_private_key(ec.SECP384R1()))

    @classmethod
    def load(cls, path) -> Identity:
        with open(path, "rb") as f:
            key = serialization.load_ssh_private_key(f.read(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(
                f"{path}: not an ECDSA private key (make one with `fedmoe agent init`)"
            )
        return cls(key)

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(data, _SIGNATURE)


def verify(identity: bytes, signature: bytes, data: bytes) -> str | None:
    """The identity's fingerprint if `signature` is its signature over `data`, else None."""
    try:
        key = load_public_key(identity.decode())
        key.verify(signature, data, _SIGNATURE)
    except (ValueError, UnicodeError, InvalidSignature, TypeError):
        return None
    return fingerprint(key)
