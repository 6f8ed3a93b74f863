"""The node's side of a SecAgg+ session it can trust: verified peers, one session, one unmask.

Flower's SecAgg+ client mod does the cryptography (keys, Shamir shares, masks); this guard runs
before it on every SecAgg+ message and enforces what the mod takes on trust from the coordinator
(client/THREAT_MODEL.md, contract/secagg_session.py for the wire format):

1. setup: signs the node's fresh SecAgg+ keys with its identity key;
2. share keys: keeps only peers whose keys carry a valid signature from an identity the node's
   federation pins (no pins: any valid signature) and that no other entry also claims; the
   session is VERIFIED when those distinct pinned members number at least the threshold t and
   t is more than half of them (two survivor sets that t members each signed then overlap in an
   honest member, who signs only one). Only a verified session lets the node add a noise share;
   otherwise it adds the full noise, or refuses (its terms);
3. masked vectors: one try per session, only with shares from enough of its members; the
   update goes out at most once per session, bound to the session on the node's ledger;
4. consistency: signs one survivor set per session, a subset of the session holding the node
   itself and at least t members;
5. unmask: answers only for the set it signed, countersigned by at least t distinct members,
   never for a node listed both as survivor and as dropped, and only once.
Anything else raises SecAggRefused, and the node reveals nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from flwr.app import ConfigRecord, Context
from flwr.common.secure_aggregation.secaggplus_constants import Key

from fedmoe.contract import secagg_session as wire
from fedmoe.contract.round import SecureSum

STATE = "fedmoe.secagg-session"


class SecAggRefused(RuntimeError):
    """A SecAgg+ message this node does not answer; nothing of its update or shares left."""


@dataclass(frozen=True)
class Federation:
    """Whom a node shares SecAgg+ secrets with: its identity, the pinned members' fingerprints
    (None: nothing pinned, so a noise share is never trusted), and what it does in a session
    it cannot verify."""

    identity: wire.Identity
    pinned: frozenset[str] | None = None
    on_unverified: Literal["full-noise", "refuse"] = "full-noise"


def _state(context: Context) -> ConfigRecord:
    return context.state.config_records.get(STATE) or ConfigRecord({"phase": "none"})


def _require(state: ConfigRecord, phase: str, doing: str) -> None:
    if state["phase"] != phase:
        raise SecAggRefused(
            f"SecAgg+ {doing} out of order (this node's session is at {state['phase']!r}); "
            "nothing revealed"
        )


def on_setup(context: Context, node_id: int, configs: ConfigRecord) -> None:
    """A new session starts (any earlier one of this Flower run is over for this node)."""
    context.state.config_records[STATE] = ConfigRecord(
        {
            "phase": "setup",
            "node_id": node_id,
            "threshold": configs[Key.THRESHOLD],
            "clipping_range": configs[Key.CLIPPING_RANGE],
        }
    )


def sign_keys(federation: Federation, reply_configs: ConfigRecord, node_id: int) -> None:
    pk1, pk2 = reply_configs[Key.PUBLIC_KEY_1], reply_configs[Key.PUBLIC_KEY_2]
    reply_configs[wire.IDENTITY] = federation.identity.public_line.encode()
    reply_configs[wire.KEY_SIGNATURE] = federation.identity.sign(
        wire.key_transcript(node_id, pk1, pk2)
    )


def join(federation: Federation, context: Context, configs: ConfigRecord) -> None:
    """Share-keys request: keep the verified peers in `configs` (Flower's mod shares with
    exactly those), drop ours and the rest, and fix the session."""
    state = _state(context)
    _require(state, "setup", "share-keys request")
    me, threshold = int(state["node_id"]), int(state["threshold"])
    claims = {
        key[len(wire.PEER) :]: configs.pop(key)
        for key in list(configs)
        if key.startswith(wire.PEER)
    }
    members: dict[int, tuple[bytes, bytes, bytes]] = {}
    owners: dict[str, list[int]] = {}
    for key in list(configs):
        if key == Key.STAGE:
            continue
        pk1, pk2 = configs[key]
        node_id = int(key)
        if node_id == me:
            identity, owner = (
                federation.identity.public_line.encode(),
                federation.identity.fingerprint,
            )
        else:
            claim = claims.get(key)
            owner = None
            if isinstance(claim, list) and len(claim) == 2:
                identity, signature = claim
                owner = wire.verify(identity, signature, wire.key_transcript(node_id, pk1, pk2))
            if owner is None or (federation.pinned is not None and owner not in federation.pinned):
                del configs[key]  # no shares for a peer this node cannot verify
                continue
        members[node_id] = (identity, pk1, pk2)
        owners.setdefault(owner, []).append(node_id)
    for ids in owners.values():
        if len(ids) > 1:  # one identity, several keys: a replay; trust none of them
            if me in ids:
                raise SecAggRefused(
                    "SecAgg+ share-keys request: another entry claims this node's identity"
                )
            for node_id in ids:
                del configs[str(node_id)], members[node_id]
    verified = (
        federation.pinned is not None and len(members) >= threshold and 2 * threshold > len(members)
    )
    if not verified and federation.on_unverified == "refuse":
        raise SecAggRefused(
            f"SecAgg+ session not verified: {len(members)} pinned members for a threshold of "
            f"{threshold} (needs at least the threshold, and a threshold above half of them); "
            "this node's terms refuse such sessions"
        )
    ids = sorted(members)
    state.update(
        {
            "phase": "joined",
            "session": wire.session_id(threshold, [(i, *members[i]) for i in ids]),
            "verified": verified,
            "member_ids": ids,
            "member_identities": [members[i][0] for i in ids],
        }
    )
    context.state.config_records[STATE] = state


def collecting(context: Context, configs: ConfigRecord) -> None:
    """Masked-vector request: the session's one try (a failure after the fit, e.g. a share that
    does not decrypt, still ends it), with enough of its own members' shares to be summed."""
    state = _state(context)
    _require(state, "joined", "masked-vector request")
    sources = configs.get(Key.SOURCE_LIST, [])
    members = set(state["member_ids"])
    if len(set(sources)) != len(sources) or not set(sources) <= members:
        raise SecAggRefused(
            "SecAgg+ masked-vector request: shares from outside this node's session"
        )
    if len(sources) + 1 < int(state["threshold"]):
        raise SecAggRefused(
            f"SecAgg+ masked-vector request: shares of {len(sources)} peers, the threshold is "
            f"{state['threshold']}"
        )
    state["phase"] = "collecting"
    context.state.config_records[STATE] = state


def secure_sum(context: Context) -> SecureSum:
    """The session the masked vector of this message goes into, as this node joined it."""
    state = _state(context)
    _require(state, "collecting", "masked-vector request")
    return SecureSum(
        threshold=int(state["threshold"]),
        clipping_range=float(state["clipping_range"]),
        session=bytes(state["session"]).hex(),
        verified=bool(state["verified"]),
    )


def collected(context: Context) -> None:
    state = _state(context)
    state["phase"] = "collected"
    context.state.config_records[STATE] = state


def sign_survivors(federation: Federation, context: Context, configs: ConfigRecord) -> bytes:
    """Consistency request: sign the survivor set, once per session."""
    state = _state(context)
    _require(state, "collected", "consistency request")
    survivors = configs.get(wire.SURVIVORS)
    if not isinstance(survivors, list) or not all(type(i) is int for i in survivors):
        raise SecAggRefused("SecAgg+ consistency request: survivors must be a list of node ids")
    members, threshold = set(state["member_ids"]), int(state["threshold"])
    if len(set(survivors)) != len(survivors) or not set(survivors) <= members:
        raise SecAggRefused("SecAgg+ consistency request: survivors outside this node's session")
    if int(state["node_id"]) not in survivors or len(survivors) < threshold:
        raise SecAggRefused(
            f"SecAgg+ consistency request: {len(survivors)} survivors, this node "
            f"{'among' if int(state['node_id']) in survivors else 'not among'} them, threshold {threshold}"
        )
    state.update({"phase": "signed", "survivors": sorted(survivors)})
    context.state.config_records[STATE] = state
    return federation.identity.sign(wire.survivors_transcript(bytes(state["session"]), survivors))


def check_unmask(context: Context, configs: ConfigRecord) -> None:
    """Unmask request: only for the survivor set this node signed, countersigned by at least
    t members of the session; the signatures are removed before Flower's mod reads the rest."""
    state = _state(context)
    _require(state, "signed", "unmask request")
    signers, signatures = configs.pop(wire.SIGNERS, []), configs.pop(wire.SIGNATURES, [])
    survivors = list(state["survivors"])
    active = configs.get(Key.ACTIVE_NODE_ID_LIST, [])
    dead = configs.get(Key.DEAD_NODE_ID_LIST, [])
    members = dict(zip(state["member_ids"], state["member_identities"], strict=True))
    if sorted(set(active)) != survivors or len(active) != len(survivors):
        raise SecAggRefused(
            "SecAgg+ unmask request: its survivors are not the set this node signed"
        )
    if set(dead) & set(survivors) or not set(dead) <= set(members) or len(set(dead)) != len(dead):
        raise SecAggRefused(
            "SecAgg+ unmask request: a node listed as dropped is a survivor or not in the session"
        )
    transcript = wire.survivors_transcript(bytes(state["session"]), survivors)
    valid = set()
    if isinstance(signers, list) and isinstance(signatures, list):
        for signer, signature in zip(signers, signatures, strict=False):
            if signer in members and isinstance(signature, bytes):
                if wire.verify(members[signer], signature, transcript) is not None:
                    valid.add(signer)
    if len(valid) < int(state["threshold"]):
        raise SecAggRefused(
            f"SecAgg+ unmask request: {len(valid)} members signed this survivor set, "
            f"{state['threshold']} needed; nothing revealed"
        )
    state["phase"] = "unmasked"
    context.state.config_records[STATE] = state
