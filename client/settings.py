"""Settings of one enterprise node: where its data and model live, its budget and ledger, the
federation it pins for secure aggregation (the enterprise's own, never the coordinator's)."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from fedmoe.client.ledger_witness import default_witness
from fedmoe.client.secagg_guard import Federation
from fedmoe.contract.keys import fingerprint, load_public_key
from fedmoe.contract.secagg_session import Identity
from fedmoe.model.data import DataFiles
from fedmoe.privacy.settings import NodeBudget


class NodeSettings(BaseModel):
    """Where one enterprise node finds its data and base model, and how much CPU it may use."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enterprise: str = Field(min_length=1, max_length=64)
    data: Path = Field(
        description="a file of training records, or a folder with train.<ext> (and heldout.<ext>)"
    )
    heldout: Path | None = Field(
        None, description="the held-out file; default the folder's, else carved (model/data.py)"
    )
    model_path: str = "embedded"
    threads: int = Field(1, ge=1, le=512, description="torch CPU threads for this client")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    budget: NodeBudget = NodeBudget()
    ledger: Path | None = Field(
        None,
        description="the node's privacy ledger (SQLite); default ~/.fedmoe/ledger-<enterprise>.sqlite",
    )

    witnessed_ledger: bool = Field(
        False,
        description="a deployed node: its ledger must exist, be its own and be no older than "
        "the witness beside its key (client/ledger_witness.py)",
    )
    ledger_witness: Path | None = Field(
        None, description="the ledger's witness; default beside identity_key (node.witness)"
    )
    identity_key: Path | None = Field(
        None,
        description="the node's private key (`fedmoe agent init`): signs its SecAgg+ keys; "
        "default: a key made for this process (then no peer can pin it)",
    )
    federation_keys: tuple[str, ...] | None = Field(
        None,
        description="OpenSSH public keys of the federation's members, pinned: a noise share "
        "only in SecAgg+ sessions of at least `threshold` of them; None: nothing pinned, "
        "full noise under SecAgg+",
    )
    unverified_secagg: Literal["full-noise", "refuse"] = Field(
        "full-noise",
        description="in a SecAgg+ session it cannot verify: add the full noise, or take no part",
    )
    fit_reply_s: float | None = Field(
        None,
        gt=0.0,
        le=86_400.0,
        description="under record-level DP, send every fit reply this many seconds after the "
        "fit began (its timing then says nothing of the data's size)",
    )

    def federation(self) -> Federation:
        """The node's SecAgg+ identity and the fingerprints it pins (its own among them)."""
        identity = (
            Identity.load(self.identity_key)
            if self.identity_key
            else _process_identity(self.enterprise)
        )
        pinned = None
        if self.federation_keys is not None:
            pinned = frozenset(
                {fingerprint(load_public_key(k)) for k in self.federation_keys}
                | {identity.fingerprint}
            )
        return Federation(identity, pinned, self.unverified_secagg)

    @property
    def data_files(self) -> DataFiles:
        return DataFiles.locate(self.data, self.heldout)

    @property
    def witness_path(self) -> Path:
        return self.ledger_witness or default_witness(self.identity_key)

    @property
    def ledger_path(self) -> Path:
        return (self.ledger or Path("~/.fedmoe") / f"ledger-{self.enterprise}.sqlite").expanduser()


@cache
def _process_identity(enterprise: str) -> Identity:
    return Identity.generate()
