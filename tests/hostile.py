"""A coordinator that deviates from the protocol, played against real nodes' ClientApps.

The coordinator here is the attacker: it builds every message itself (any content, any order,
any number of Flower runs, each run its own node context as a SuperNode keeps it), fakes SecAgg+
peers with keys of its own or replays honest peers' signed keys from earlier sessions, and keeps
everything it is sent, decrypting what it can. `Ledger checks` and `isolatable` say what it has
won: the tests assert it never beats the node's guarantees.

Parties are real `build_client_app` ClientApps (Flower's SecAgg+ mod behind fedmoe's guard), over
a real `EnterpriseNode` (the victim) or over `HonestPeer`s (a fixed update, the same guard).
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from copy import deepcopy
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.app.error import Error
from flwr.app.message_type import MessageType
from flwr.common import (
    EvaluateIns,
    FitIns,
    GetPropertiesIns,
    bytes_to_ndarray,
    ndarrays_to_parameters,
)
from flwr.common.constant import ErrorCode, MessageTypeLegacy
from flwr.common.secure_aggregation.crypto.symmetric_encryption import (
    decrypt,
    encrypt,
    generate_shared_key,
)
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.common.secure_aggregation.secaggplus_utils import (
    share_keys_plaintext_concat,
    share_keys_plaintext_separate,
)
from flwr.compat.common import recorddict_compat as compat
from flwr.supercore.primitives.asymmetric import (
    bytes_to_private_key,
    bytes_to_public_key,
    generate_key_pairs,
    private_key_to_bytes,
    public_key_to_bytes,
)

from fedmoe.client import secagg_guard
from fedmoe.client.client_app import build_client_app
from fedmoe.client.enterprise import EnterpriseNode
from fedmoe.client.settings import NodeSettings
from fedmoe.contract import secagg_session as wire
from fedmoe.contract.keys import write_key_pair
from fedmoe.contract.round import LocalTrainSettings
from fedmoe.contract.secagg_session import Identity
from fedmoe.contract.secagg_transport import unpack
from fedmoe.model.corpus import DEMO_DATA_DIR
from fedmoe.model.settings import LoraSettings
from fedmoe.privacy.settings import NodeBudget

RANGE = 8.0


def digest(arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


class Party:
    """A node as the coordinator reaches it: its ClientApp, one context per Flower run, and
    every reply that ever left it."""

    def __init__(self, node_id: int, node):
        self.node_id, self.node = node_id, node
        self.app = build_client_app(lambda context: node)
        self.contexts: dict[int, Context] = {}
        self.replies: list[Message] = []

    def send(self, run: int, content: RecordDict, message_type: str) -> Message:
        context = self.contexts.setdefault(
            run,
            Context(
                run_id=run, node_id=self.node_id, node_config={}, state=RecordDict(), run_config={}
            ),
        )
        message = Message(
            content=deepcopy(content),
            dst_node_id=self.node_id,
            message_type=message_type,
            group_id=str(run),
        )
        try:
            reply = self.app(message=message, context=context)
        except Exception as err:  # noqa: BLE001 - as the agent's executor: an error reply
            reason = f"{type(err)}:<'{err}'>"
            reply = Message(
                Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=message
            )
        if reply.has_content():
            unpack(reply.content)
        self.replies.append(reply)
        return reply

    def session(self, run: int) -> bytes | None:
        """The SecAgg+ session this party joined in Flower run `run`, if any."""
        context = self.contexts.get(run)
        state = context and context.state.config_records.get(secagg_guard.STATE)
        return bytes(state["session"]) if state and "session" in state else None

    def ask_budget(self, run: int, config: dict) -> Message:
        content = compat.getpropertiesins_to_recorddict(
            GetPropertiesIns({**config, "query": "budget"})
        )
        return self.send(run, content, MessageTypeLegacy.GET_PROPERTIES)

    def fit(self, run: int, adapter: np.ndarray, config: dict) -> Message:
        content = compat.fitins_to_recorddict(
            FitIns(ndarrays_to_parameters([adapter]), config), True
        )
        return self.send(run, content, MessageType.TRAIN)

    def evaluate(self, run: int, adapter: np.ndarray, config: dict) -> Message:
        content = compat.evaluateins_to_recorddict(
            EvaluateIns(ndarrays_to_parameters([adapter]), config), True
        )
        return self.send(run, content, MessageType.EVALUATE)


@dataclass
class HonestPeer:
    """A pinned, honest member: a fixed update, the real guard; it records the noise share it
    would add (its variance, in units of the full noise) for every session it sends into."""

    federation: object
    size: int = 8
    variances: dict[str, float] = field(default_factory=dict)  # session -> variance

    def fit(self, parameters, config, secure_sum):
        shares = secure_sum.threshold if secure_sum.verified else 1
        self.variances[secure_sum.session] = 1.0 / shares
        return [np.zeros(self.size, np.float32)], 1, {}


@dataclass
class Fake:
    """A peer the coordinator plays: fresh keys it holds, or an honest peer's old signed keys."""

    node_id: int
    pk1: bytes
    pk2: bytes
    sk1_known: bool  # whether the coordinator can compute the pairwise masks made with pk1
    sk2: bytes | None  # None: it cannot read what is encrypted to this peer
    claim: list[bytes] | None


def fresh_keys() -> tuple[bytes, bytes, bytes, bytes]:
    (sk1, pk1), (sk2, pk2) = generate_key_pairs(), generate_key_pairs()
    return (
        private_key_to_bytes(sk1),
        public_key_to_bytes(pk1),
        private_key_to_bytes(sk2),
        public_key_to_bytes(pk2),
    )


class SecAggSession:
    """One SecAgg+ session as the coordinator runs it, deviating wherever it likes."""

    def __init__(
        self,
        run: int,
        parties: dict[int, Party],
        threshold: int,
        stolen: set[bytes],
        clipping_range: float = RANGE,
    ):
        self.run, self.parties, self.threshold = run, parties, threshold
        self.clipping_range = clipping_range
        self.stolen = stolen  # pk1s of earlier sessions whose sk1 the coordinator could rebuild
        self.keys: dict[int, tuple[bytes, bytes]] = {}
        self.claims: dict[int, list[bytes]] = {}
        self.fakes: dict[int, Fake] = {}
        self.inbox: dict[int, list[tuple[int, bytes]]] = defaultdict(list)  # dst -> (src, ct)
        self.masked_with: dict[int, set[int]] = {}  # sender -> peers it masked with
        self.thresholds: dict[int, int] = {}  # party -> the threshold it shares with
        self.seed_holders: dict[int, set[int]] = defaultdict(set)
        self.sk_holders: dict[int, set[int]] = defaultdict(set)
        self.signatures: dict[int, bytes] = {}

    # --- the coordinator's side of each stage ---------------------------------------------
    def setup(self, to: list[int]) -> None:
        n = len(to) + len(self.fakes)
        for nid in to:
            configs = {
                Key.STAGE: Stage.SETUP,
                Key.SAMPLE_NUMBER: n,
                Key.SHARE_NUMBER: n,
                Key.THRESHOLD: self.threshold,
                Key.CLIPPING_RANGE: self.clipping_range,
                Key.TARGET_RANGE: 1 << 22,
                Key.MOD_RANGE: 1 << 32,
                Key.MAX_WEIGHT: 1.0,
            }
            reply = self.parties[nid].send(
                self.run, RecordDict({RECORD_KEY_CONFIGS: ConfigRecord(configs)}), MessageType.TRAIN
            )
            if reply.has_content():
                got = reply.content.config_records[RECORD_KEY_CONFIGS]
                self.keys[nid] = (got[Key.PUBLIC_KEY_1], got[Key.PUBLIC_KEY_2])
                self.claims[nid] = [got[wire.IDENTITY], got[wire.KEY_SIGNATURE]]
                self.thresholds[nid] = self.threshold

    def add_fake(self, node_id: int, kind: str, archive=None) -> None:
        """kind: unsigned | unpinned (signed by an identity no one pins) | stolen-claim (an
        honest peer's identity and old signature on new keys) | replay (an honest peer's old
        keys and signature, as they were)."""
        sk1, pk1, sk2, pk2 = fresh_keys()
        claim = None
        if kind == "unpinned":  # a fresh identity for each: they cost the coordinator nothing
            identity = Identity.generate()
            claim = [
                identity.public_line.encode(),
                identity.sign(wire.key_transcript(node_id, pk1, pk2)),
            ]
        elif kind in ("stolen-claim", "replay") and archive:
            old_id, (old_pk1, old_pk2), old_claim = archive
            claim = list(old_claim)
            if kind == "replay":
                node_id, pk1, pk2, sk2 = old_id, old_pk1, old_pk2, None
        sk1_known = kind != "replay" or pk1 in self.stolen
        self.fakes[node_id] = Fake(node_id, pk1, pk2, sk1_known, sk2, claim)
        self.keys[node_id] = (pk1, pk2)
        if claim:
            self.claims[node_id] = claim

    def share_keys(self, views: dict[int, list[int]]) -> None:
        """views: party -> the members whose keys it is shown (a coordinator may show each
        party another set)."""
        for nid, members in views.items():
            configs = {Key.STAGE: Stage.SHARE_KEYS}
            for m in members:
                if m in self.keys:
                    configs[str(m)] = list(self.keys[m])
                    if m in self.claims:
                        configs[wire.PEER + str(m)] = list(self.claims[m])
            reply = self.parties[nid].send(
                self.run, RecordDict({RECORD_KEY_CONFIGS: ConfigRecord(configs)}), MessageType.TRAIN
            )
            if not reply.has_content():
                continue
            got = reply.content.config_records[RECORD_KEY_CONFIGS]
            for dst, ct in zip(got[Key.DESTINATION_LIST], got[Key.CIPHERTEXT_LIST], strict=True):
                self.inbox[dst].append((nid, ct))
                fake = self.fakes.get(dst)
                if fake and fake.sk2:  # the coordinator reads what is sent to its own peers
                    key = generate_shared_key(
                        bytes_to_private_key(fake.sk2), bytes_to_public_key(self.keys[nid][1])
                    )
                    src, _, _, _ = share_keys_plaintext_separate(decrypt(key, ct))
                    self.seed_holders[src].add(dst)
                    self.sk_holders[src].add(dst)

    def forge_from_fakes(self, to: int) -> None:
        """Fakes whose sk2 the coordinator holds send `to` shares of nothing."""
        for fake in self.fakes.values():
            if fake.sk2 and to in self.keys:
                key = generate_shared_key(
                    bytes_to_private_key(fake.sk2), bytes_to_public_key(self.keys[to][1])
                )
                text = share_keys_plaintext_concat(fake.node_id, to, b"\x01" * 32, b"\x02" * 32)
                self.inbox[to].append((fake.node_id, encrypt(key, text)))

    def collect(self, to: list[int], fit_content) -> None:
        for nid in to:
            sources = [src for src, _ in self.inbox.get(nid, [])]
            configs = {
                Key.STAGE: Stage.COLLECT_MASKED_VECTORS,
                Key.CIPHERTEXT_LIST: [ct for _, ct in self.inbox.get(nid, [])],
                Key.SOURCE_LIST: sources,
            }
            content = fit_content(nid)
            content.config_records[RECORD_KEY_CONFIGS] = ConfigRecord(configs)
            reply = self.parties[nid].send(self.run, content, MessageType.TRAIN)
            if reply.has_content() and Key.MASKED_PARAMETERS in (
                reply.content.config_records.get(RECORD_KEY_CONFIGS) or {}
            ):
                self.masked_with[nid] = set(sources)

    def consistency(self, to: list[int], survivors: list[int]) -> None:
        configs = {Key.STAGE: wire.CONSISTENCY, wire.SURVIVORS: survivors}
        for nid in to:
            reply = self.parties[nid].send(
                self.run, RecordDict({RECORD_KEY_CONFIGS: ConfigRecord(configs)}), MessageType.TRAIN
            )
            if reply.has_content():
                got = reply.content.config_records[RECORD_KEY_CONFIGS]
                self.signatures[nid] = got[wire.SURVIVOR_SIGNATURE]

    def unmask(self, to: list[int], active: list[int], dead: list[int], forge: bool) -> None:
        signers = sorted(self.signatures)
        signatures = [self.signatures[s] for s in signers]
        if forge:  # signatures the coordinator makes up, under members' ids
            signers += [nid for nid in self.keys if nid not in self.signatures]
            signatures += [b"\x00" * 96] * (len(signers) - len(signatures))
        configs = {
            Key.STAGE: Stage.UNMASK,
            Key.ACTIVE_NODE_ID_LIST: active,
            Key.DEAD_NODE_ID_LIST: dead,
            wire.SIGNERS: signers,
            wire.SIGNATURES: signatures,
        }
        for nid in to:
            reply = self.parties[nid].send(
                self.run, RecordDict({RECORD_KEY_CONFIGS: ConfigRecord(configs)}), MessageType.TRAIN
            )
            if not reply.has_content():
                continue
            got = reply.content.config_records[RECORD_KEY_CONFIGS]
            owners = got[Key.NODE_ID_LIST]
            # Flower answers the active nodes' mask-seed shares first, then the dead ones' keys.
            for i, owner in enumerate(owners):
                (self.seed_holders if i < len(active) else self.sk_holders)[owner].add(nid)

    # --- what the coordinator has won --------------------------------------------------------
    def knows_sk1(self, nid: int) -> bool:
        fake = self.fakes.get(nid)
        if fake is not None and nid not in self.parties:
            return fake.sk1_known
        return len(self.sk_holders[nid]) >= self.thresholds.get(nid, 1)

    def knows_seed(self, nid: int) -> bool:
        return len(self.seed_holders[nid]) >= self.thresholds.get(nid, 1)

    def isolatable(self) -> list[tuple[int, ...]]:
        """Every set of honest senders whose sum the coordinator can compute alone: it knows each
        one's mask seed and every pairwise mask they share with anyone outside the set."""
        senders = sorted(self.masked_with)
        found = []
        for size in range(1, len(senders) + 1):
            for group in combinations(senders, size):
                if all(self.knows_seed(i) for i in group) and all(
                    self.knows_sk1(i) or self.knows_sk1(j)
                    for i in group
                    for j in self.masked_with[i]
                    if j not in group
                ):
                    found.append(group)
        return found


def masked_vector(reply: Message) -> list[np.ndarray] | None:
    configs = reply.content.config_records.get(RECORD_KEY_CONFIGS) if reply.has_content() else None
    if not configs or Key.MASKED_PARAMETERS not in configs:
        return None
    return [bytes_to_ndarray(b) for b in configs[Key.MASKED_PARAMETERS]]


# --- the parties of the tests -------------------------------------------------------------
LORA = LoraSettings(r=1, alpha=2.0, targets=["attention"])
TRAIN = LocalTrainSettings(local_steps=1, batch_size=2, seq_len=16)
ENTERPRISE = {"epsilon": 8.0, "clip": 0.05}
PLANS = {
    "enterprise": {"enterprise": ENTERPRISE},
    # The same noise: the same ledger key (a field that does not change the noise never splits a run).
    "enterprise, noisy plan accepted": {"enterprise": ENTERPRISE, "accept_noisy_plan": True},
    "both levels": {"record": {"epsilon": 8.0, "sample_rate": 0.01}, "enterprise": ENTERPRISE},
}
PRIVATE_METRICS = {"enterprise", "epsilon_record", "epsilon_enterprise"}


class Victim(EnterpriseNode):
    """The real node, with a record of every draw it made and everything its fit returned."""

    def __init__(self, settings):
        super().__init__(settings)
        self.attempts: list[tuple[str, int]] = []  # (ledger key, round) of every draw begun
        self.shares: dict[str, int] = {}  # release digest -> the noise shares it carries
        self.outputs: list[tuple[str, str, dict]] = []  # (digest, session, metrics) returned
        self.losses: list[float] = []

    def _draw(self, spec, ws, plan, global_vector, shares, value_range, secure_sum):
        self.attempts.append((spec.ledger_key(), spec.server_round))
        release = super()._draw(spec, ws, plan, global_vector, shares, value_range, secure_sum)
        self.shares[digest(release.arrays)] = shares
        return release

    def fit(self, parameters, config, secure_sum):
        arrays, weight, metrics = super().fit(parameters, config, secure_sum)
        session = secure_sum.session if secure_sum else "clear"
        self.outputs.append((digest(arrays), session, dict(metrics)))
        return arrays, weight, metrics

    def evaluate(self, parameters, config):
        loss, n, metrics = super().evaluate(parameters, config)
        self.losses.append(loss)
        return loss, n, metrics


def make_federation(root: Path):
    """Identity keys of the victim (1) and peers (2, 3), and the attacker's own (pinned by no one)."""
    lines = {n: write_key_pair(root / f"{n}.key", root / f"{n}.pub") for n in (1, 2, 3)}
    keys = {n: root / f"{n}.key" for n in (1, 2, 3)}
    return keys, tuple(lines.values()), Identity.generate()


def make_victim(directory: Path, federation, **settings) -> Victim:
    keys, pinned, _ = federation
    defaults = dict(
        enterprise="finance",
        data=DEMO_DATA_DIR / "finance",
        ledger=directory / "ledger.sqlite",
        identity_key=keys[1],
        federation_keys=pinned,
        budget=NodeBudget(enterprise_epsilon=60.0),
    )
    return Victim(NodeSettings(**(defaults | settings)))


def make_peer(n: int, federation) -> HonestPeer:
    keys, pinned, _ = federation
    settings = NodeSettings(
        enterprise=f"peer{n}", data=".", identity_key=keys[n], federation_keys=pinned
    )
    return HonestPeer(settings.federation())
