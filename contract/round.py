"""The round contract: what the coordinator sends each round and what a node answers.

The only module both sides of the trust boundary read besides model/ and privacy/: the
coordinator builds a `RoundSpec` and sends `to_config()`; a node rebuilds it with `from_config()`,
which refuses anything malformed with the key that is wrong (a node never trusts the
coordinator's types). Light on purpose (pydantic only): the node's per-message ClientApp reads it.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fedmoe.model.settings import BaseLoading, LoraSettings
from fedmoe.privacy.settings import PrivacySettings

# Flower config values are scalars: nested settings travel as JSON text.
NESTED = ("lora", "base", "train", "privacy")
BUDGET_QUERY = "budget"  # the `query` key of the budget handshake


class MalformedRound(ValueError):
    """A round config or an answer that does not follow the contract; names the key."""


class LocalTrainSettings(BaseModel):
    """Local training hyperparameters; the coordinator sends them in every round's config."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    local_steps: int = Field(
        12, ge=1, le=100_000, description="optimizer steps per client per round"
    )
    batch_size: int = Field(8, ge=1, le=4096, description="sequences per step")
    seq_len: int = Field(64, ge=8, le=32_768, description="tokens per training sequence")
    # Below 1e-8 AdamW moves no float32 weight: such a run would train nothing, silently.
    lr: float = Field(3e-3, ge=1e-8, le=1.0, description="AdamW learning rate")
    weight_decay: float = Field(0.0, ge=0.0, le=1.0)
    max_grad_norm: float = Field(
        1.0, ge=1e-6, le=1e6, description="gradient-norm clip for stability (not a privacy bound)"
    )
    eval_batch_size: int = Field(16, ge=1, le=4096)
    seed: int = Field(0, ge=0, lt=2**63)


class RoundSpec(BaseModel):
    """One round as the coordinator asks it of every node."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    server_round: int = Field(ge=1, le=1_000_000)
    rounds: int = Field(ge=1, le=1_000_000, description="rounds the run's privacy plan covers")
    run_uid: str = Field(
        pattern=r"^[0-9a-f]{32}$", description="the run's identity on every node's ledger"
    )
    run_number: int = Field(
        0,
        ge=0,
        le=2**53,
        description="the coordinator's number for the run: a label in the node's ledger (0: none)",
    )
    lora: LoraSettings
    base: BaseLoading
    train: LocalTrainSettings
    privacy: PrivacySettings
    base_fingerprint: str = Field(pattern=r"^[0-9a-f]{64}$")
    adapter_layout: str = Field(pattern=r"^[0-9a-f]{16}$")
    measure_baseline: bool = Field(
        False,
        description="score the adapter received on the held-out split before training (public "
        "runs in the clear): round 1's is the base model's, later ones evaluate the last round",
    )
    noise_shares: int = Field(
        1, ge=1, le=1_000_000, description="clients whose noise shares sum to the full noise"
    )
    secagg_range: float | None = Field(
        None, gt=0.0, description="SecAgg+ clipping range of this round"
    )
    audit: bool = Field(
        False, description="an evaluate message that asks for the one-run audit's counts"
    )
    aggregation: Literal["fedavg", "expert-weighted"] = "fedavg"

    def to_config(self, **extra) -> dict:
        config = self.model_dump(exclude=set(NESTED), exclude_none=True)
        config.update({key: getattr(self, key).model_dump_json() for key in NESTED})
        return {**config, **extra}

    @classmethod
    def from_config(cls, config: Mapping) -> RoundSpec:
        data = {k: v for k, v in config.items() if k != "query"}
        try:
            for key in NESTED:
                data[key] = (
                    json.loads(data[key]) if isinstance(data.get(key), str) else data.get(key)
                )
            return cls.model_validate(data)
        except KeyError as err:
            raise MalformedRound(f"round config: missing key {err}") from None
        except (ValueError, TypeError) as err:
            raise MalformedRound(f"round config: {_first_problem(err)}") from None

    def ledger_key(self) -> str:
        """The node's ledger key for this run: a different plan under the same run uid counts as a
        different run, so a coordinator cannot change the noise mid-run and keep the tight
        within-run accounting. Only what sets the noise and its accounting is in it (the levels,
        the rounds and steps the plan covers); anything else (accepting a noisy plan, the audit,
        the batch size, the public bound on records) would split one run into several and charge
        it more than once."""
        plan = [
            self.privacy.model_dump(
                include={"record", "enterprise"}, exclude={"record": {"min_records"}}
            ),
            self.rounds,
            self.train.local_steps,
        ]
        digest = hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()[:16]
        return f"{self.run_uid}:{digest}"


@dataclass(frozen=True)
class SecureSum:
    """The SecAgg+ session a node's update goes into, as the node itself joined it (from
    Flower's SecAgg+ setup and the peers it verified, never from the round config): no sum of
    fewer than `threshold` clients' updates can be unmasked, values outside [-clipping_range,
    clipping_range] would be clipped, `session` names the session (its members' keys), and
    `verified` says whether at least `threshold` pinned members hold it (client/secagg_guard.py)."""

    threshold: int
    clipping_range: float
    session: str = ""
    verified: bool = False


@dataclass(frozen=True)
class BudgetAnswer:
    """A node's answer to the budget handshake: would this round fit its own budget?"""

    accept: bool
    reason: str = ""
    enterprise: str = ""  # what the node calls itself; the coordinator trusts its registry instead
    epsilon_record: float = math.inf  # the run's epsilon after this round (inf: no guarantee)
    epsilon_enterprise: float = math.inf
    # The node could not take part (an error, not its terms): the round fails it by name.
    failed: bool = False

    def to_properties(self) -> dict:
        return asdict(self)

    @classmethod
    def from_properties(cls, properties: Mapping) -> BudgetAnswer:
        try:
            answer = cls(
                accept=properties["accept"],
                reason=str(properties.get("reason", ""))[:2000],
                enterprise=str(properties.get("enterprise", ""))[:64],
                epsilon_record=float(properties.get("epsilon_record", math.inf)),
                epsilon_enterprise=float(properties.get("epsilon_enterprise", math.inf)),
                failed=properties.get("failed", False),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise MalformedRound(f"budget answer: {err!r}") from None
        if (
            not isinstance(answer.accept, bool)
            or not isinstance(answer.failed, bool)
            or any(
                math.isnan(e) or e < 0 for e in (answer.epsilon_record, answer.epsilon_enterprise)
            )
        ):
            raise MalformedRound(f"budget answer: malformed values {properties!r:.200}")
        return answer


def _first_problem(err: Exception) -> str:
    if isinstance(err, ValidationError):
        e = err.errors()[0]
        return f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
    return str(err)[:300]
