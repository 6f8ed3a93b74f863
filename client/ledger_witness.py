"""A deployed node's ledger cannot vanish or roll back unnoticed.

The ledger (client/ledger.py) is the node's only memory of what it spent. Deleted, replaced by an
older copy or by another node's, it would silently reset the lifetime budget. So:

- An agent's ledger is made once, explicitly (`fedmoe agent --config agent.toml --new-ledger`),
  never by starting the agent, and it carries the node's identity: the fingerprint of the node's
  key, its enterprise name, when it was made, and a random ledger id.
- A **witness** file beside the node's private key (`keys/node.witness`; `ledger_witness` in
  agent.toml puts it elsewhere, never on the ledger's volume) records that ledger id,
  how many spend entries the ledger holds and the lifetime epsilon and delta it added up to,
  rewritten (atomically) after every charge. The key folder is the node's identity: a ledger
  restored, recreated or swapped on its own disagrees with it, and replacing the key too makes
  a new node that the federation's admin must register (and that every peer must pin).
- The agent refuses to start on a missing ledger, one of another node, one that is not the ledger
  the witness names, one with fewer entries than the witness counted, a damaged one, or a
  ledger whose witness is missing (nothing could tell a rollback); each refusal names the
  file and the command that fixes it. A crash between a charge and the witness's update leaves
  the ledger AHEAD of the witness, which is accepted (the witness catches up).
- A restore from backup is an explicit command (`fedmoe agent --config agent.toml
  restore-ledger`): it says what the restored copy lacks and carries that spend into it as one
  entry, so the lifetime budget never goes back.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
from contextlib import closing
from dataclasses import asdict, dataclass
from pathlib import Path

from fedmoe.client.ledger import LEVELS, PrivacyLedger
from fedmoe.contract.secagg_session import Identity

RESTORE = "`fedmoe agent --config agent.toml restore-ledger`"


class LedgerRefused(RuntimeError):
    """The agent must not start on this ledger; the message says why and what fixes it."""


@dataclass(frozen=True)
class Witness:
    ledger_id: str
    charges: int
    lifetime: dict[str, list[float]]  # level -> [epsilon, delta]: what the ledger added up to


def default_witness(key: Path) -> Path:
    return Path(key).with_suffix(".witness")


def read_witness(path: Path) -> Witness | None:
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        return Witness(str(data["ledger_id"]), int(data["charges"]), dict(data["lifetime"]))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise LedgerRefused(
            f"the ledger witness {path} is unreadable ({err}); restore it from the backup of "
            "the node's key folder"
        ) from None


def write_witness(path: Path, ledger: PrivacyLedger) -> None:
    """The ledger's id, size and lifetime spend, beside the key: written whole, then renamed."""
    lifetime = {level: [ledger.lifetime(level), ledger.lifetime_delta(level)] for level in LEVELS}
    witness = Witness(ledger.identity().ledger_id, ledger.charges(), lifetime)
    staging = path.with_suffix(".witness.tmp")
    with open(staging, "w") as f:
        json.dump(asdict(witness), f)
        f.flush()
        os.fsync(f.fileno())
    staging.replace(path)


def _node_fingerprint(key: Path) -> str:
    return Identity.load(key).fingerprint


def _open(path: Path) -> PrivacyLedger:
    """The ledger, checked whole (SQLite's quick_check reads every page), so that damage deep in
    the file stops the agent here rather than in a round."""
    try:
        with closing(sqlite3.connect(path)) as db:
            problems = [row[0] for row in db.execute("PRAGMA quick_check")]
        if problems != ["ok"]:
            raise sqlite3.DatabaseError(" ".join(" ".join(problems).split())[:200])
        ledger = PrivacyLedger(path)
        ledger.charges()
        return ledger
    except sqlite3.DatabaseError as err:
        raise LedgerRefused(
            f"the ledger {path} is damaged ({err}); restore it from a backup, then {RESTORE}"
        ) from None


def create_ledger(path: Path, key: Path, enterprise: str, witness_file: Path) -> PrivacyLedger:
    """A new, empty ledger for a node that never trained; refused where the node's witness shows
    that it has (its ledger is missing, not new)."""
    path, key = Path(path), Path(key)
    witness = read_witness(witness_file)
    if path.exists():
        raise LedgerRefused(f"the ledger {path} exists already; --new-ledger makes only a new one")
    if witness is not None and witness.charges > 0:
        raise LedgerRefused(
            f"this node's witness ({witness_file}) counts {witness.charges} charges in ledger "
            f"{witness.ledger_id[:8]}: its ledger {path} is missing, not new. Restore it from "
            "backup, then `fedmoe agent --config agent.toml restore-ledger`"
        )
    ledger = PrivacyLedger(path)
    ledger.stamp(_node_fingerprint(key), enterprise)
    write_witness(witness_file, ledger)
    return ledger


def open_ledger(path: Path, key: Path, witness_file: Path) -> PrivacyLedger:
    """The node's ledger, checked against its key and witness; LedgerRefused otherwise. The
    returned ledger keeps the witness up to date after every charge."""
    path, key = Path(path), Path(key)
    if not path.exists():
        raise LedgerRefused(
            f"no ledger at {path}. A node that never trained makes one: `fedmoe agent --config "
            "agent.toml --new-ledger`; one that has restores its backup, then `fedmoe agent "
            "--config agent.toml restore-ledger`"
        )
    ledger = _open(path)
    mine = _node_fingerprint(key)
    identity = ledger.identity()
    witness = read_witness(witness_file)
    if identity is None:  # a ledger from before identities: adopted once, by an unwitnessed node
        if witness is not None:
            raise LedgerRefused(
                f"the ledger {path} carries no identity, but {witness_file} names ledger "
                f"{witness.ledger_id[:8]}: restore the node's own ledger from its backup, "
                f"then {RESTORE}"
            )
        identity = ledger.stamp(mine, "")
        write_witness(witness_file, ledger)
    if identity.fingerprint != mine:
        raise LedgerRefused(
            f"the ledger {path} belongs to another node (key {identity.fingerprint}, enterprise "
            f"{identity.enterprise!r}), not to this node's key {mine}; point agent.toml's "
            "`ledger` at this node's own ledger, or put its backup there, then "
            f"{RESTORE}"
        )
    if witness is None:
        # The witness is what tells a rolled-back copy from the real ledger: without it, this
        # ledger is taken as the node's record only by an operator's explicit restore.
        raise LedgerRefused(
            f"this node's witness {witness_file} is missing, so the ledger {path} "
            f"({ledger.charges()} charges) cannot be checked against a rollback. Put the "
            f"witness back from the key folder's backup, or accept this ledger as the node's "
            f"record with {RESTORE}"
        )
    if witness.ledger_id != identity.ledger_id:
        raise LedgerRefused(
            f"the ledger {path} ({identity.ledger_id[:8]}) is not the one this node recorded "
            f"({witness.ledger_id[:8]}, {witness_file}): restore that one from its backup; "
            f"{RESTORE} accepts this one and carries the spend it lacks into it"
        )
    if ledger.charges() < witness.charges:
        raise LedgerRefused(
            f"the ledger {path} holds {ledger.charges()} charges, fewer than the "
            f"{witness.charges} this node recorded ({witness_file}): it was rolled back. "
            f"If it is a backup you restored on purpose, {RESTORE} carries the missing spend "
            "into it"
        )
    write_witness(witness_file, ledger)  # ahead after a crash: the witness catches up
    ledger.on_charge = lambda _: write_witness(witness_file, ledger)
    return ledger


def restore_ledger(path: Path, key: Path, witness_file: Path) -> list[str]:
    """Accept a restored copy of the node's own ledger: the spend it lacks against the witness
    goes into it as one carried entry per level. Returns what it did, line by line."""
    path, key = Path(path), Path(key)
    if not path.exists():
        raise LedgerRefused(f"no ledger at {path} to restore; copy the backup there first")
    ledger = _open(path)
    identity = ledger.identity()
    mine = _node_fingerprint(key)
    if identity is not None and identity.fingerprint != mine:
        raise LedgerRefused(
            f"the ledger {path} belongs to another node (key {identity.fingerprint}); "
            "restore this node's own backup"
        )
    witness = read_witness(witness_file)
    if identity is None:
        identity = ledger.stamp(mine, "")
    said = []
    if witness is None:
        said.append(
            f"no witness at {witness_file}: this ledger ({ledger.charges()} charges, lifetime "
            f"epsilon {ledger.lifetime('record'):.4g} record-level, "
            f"{ledger.lifetime('enterprise'):.4g} enterprise-level) is taken as the node's "
            "record as it stands; nothing could check it against a rollback"
        )
    else:
        for level in LEVELS:
            witnessed, delta = witness.lifetime.get(level, [0.0, 0.0])
            missing = witnessed - ledger.lifetime(level)
            if missing > 1e-12 or (
                math.isinf(witnessed) and not math.isinf(ledger.lifetime(level))
            ):
                missing_delta = max(delta - ledger.lifetime_delta(level), 0.0)
                ledger.carry(level, missing, missing_delta, "restore")
                said.append(
                    f"{level}-level: the copy lacks epsilon {missing:.4g} (delta {missing_delta:.3g}) "
                    "this node spent; carried into it as one entry"
                )
        lost = witness.charges - ledger.charges()
        if lost > 0:
            said.append(f"{lost} charge entries are not in the copy (their spend is carried)")
    # The witness now names this ledger: its id, its count.
    if witness is not None:
        with closing(sqlite3.connect(path)) as db, db:
            db.execute("UPDATE identity SET ledger_id = ?", (witness.ledger_id,))
    write_witness(witness_file, ledger)
    said.append(f"the ledger {path} is this node's ledger again; lifetime spend kept")
    return said
