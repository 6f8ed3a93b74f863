"""The run database as the admin API's messages (fedmoe.proto): one conversion, used by the admin
API and by the local `fedmoe runs|rounds|privacy` commands, so both print the same tables."""

from __future__ import annotations

import datetime as dt
import json

from fedmoe.coordinator.config import RunConfig
from fedmoe.coordinator.store.db import (
    Node,
    Participation,
    Round,
    RoundDigest,
    Run,
    RunDigest,
    RunStore,
)
from fedmoe.coordinator.store.outcome import outcome
from fedmoe.privacy.plan import plan_enterprise_level
from fedmoe.proto import admin_pb2 as pb


def _time(value: dt.datetime | None) -> str:
    if value is None:
        return ""
    if value.tzinfo is None:  # SQLite drops the zone; everything is written in UTC
        value = value.replace(tzinfo=dt.UTC)
    return value.isoformat(timespec="milliseconds")  # round times to a tenth of a second


def privacy_plan_summary(config: RunConfig) -> dict:
    """What a run promises, stored with the run when it is created."""
    privacy = config.privacy
    summary: dict = {"secure_aggregation": config.federation.secure_aggregation.enabled}
    if privacy.record:
        summary["record"] = privacy.record.model_dump()
    if privacy.enterprise:
        plan = plan_enterprise_level(privacy.enterprise, config.federation.rounds)
        summary["enterprise"] = {
            **privacy.enterprise.model_dump(),
            "noise_multiplier": plan.noise_multiplier,
        }
    return summary


def describe_privacy(plan: dict | None) -> str:
    """One line: what a run promises, from its stored privacy plan."""
    plan = plan or {}
    parts = []
    if record := plan.get("record"):
        rate = f" sample rate {record['sample_rate']:g}" if "sample_rate" in record else ""
        parts.append(
            f"record-level DP-SGD eps {record['epsilon']:g} delta {record['delta']:g} "
            f"clip {record['clip']:g}{rate} ({record['accountant']})"
        )
    if entp := plan.get("enterprise"):
        delta = f" delta {entp['delta']:g}" if entp["mechanism"] == "gaussian" else ""
        parts.append(
            f"enterprise-level {entp['mechanism']} eps {entp['epsilon']:g}{delta} "
            f"clip {entp['clip']:g} noise x{entp['noise_multiplier']:.3g} "
            f"({entp.get('adjacency', 'zero-out')} adjacency)"
        )
    if not parts:
        return "privacy OFF: this run makes no differential-privacy claim"
    secagg = "on" if plan.get("secure_aggregation") else "off"
    return "privacy: " + "; ".join(parts) + f"; secure aggregation {secagg}"


def _epsilon_spent(rounds: list[Round]) -> dict[str, float | None]:
    spent = {}
    for level in ("record", "enterprise"):
        values = [
            getattr(p, f"epsilon_{level}")
            for r in rounds
            for p in r.participations
            if getattr(p, f"epsilon_{level}") is not None
        ]
        spent[level] = max(values, default=None)
    return spent


def run_message(
    run: Run, rounds: list[Round] | list[RoundDigest], spent: dict | None = None
) -> pb.Run:
    """A run as the admin API serves it. `spent`: the most epsilon per level, when the caller
    has it already (RunStore.run_digests); else read from the rounds' participations."""
    result = outcome(rounds, run.base_eval_loss)
    spent = _epsilon_spent(rounds) if spent is None else spent
    plan = run.privacy_plan or {}
    epsilons = {
        f"{level}_epsilon_{kind}": value
        for level in ("record", "enterprise")
        for kind, value in (
            ("spent", spent.get(level)),
            ("target", (plan.get(level) or {}).get("epsilon")),
        )
        if value is not None
    }
    return pb.Run(
        id=run.id,
        status=run.status,
        planned_rounds=run.planned_rounds,
        completed_rounds=sum(r.status == "completed" for r in rounds),
        started_at=_time(run.started_at),
        ended_at=_time(run.ended_at),
        error=run.error or "",
        base_fingerprint=run.base_fingerprint or "",
        engine=run.engine,
        enterprises=run.enterprises or [],
        resumes=run.resumes,
        started_by=run.started_by or "",
        privacy=describe_privacy(run.privacy_plan),
        config_json=json.dumps(run.config, sort_keys=True),
        base_eval_loss=run.base_eval_loss,
        best_eval_loss=result.best_loss if result else None,
        best_round=(result.best_round or 0) if result else 0,
        result_basis=result.basis if result else "",
        result_base_loss=result.base_loss if result else None,
        **epsilons,
    )


def runs_response(store: RunStore) -> pb.ListRunsResponse:
    """Every run, oldest first: the admin API's ListRuns and the dashboard's /api/runs."""
    digests = store.run_digests()
    response = pb.ListRunsResponse()
    for run in store.runs():
        digest = digests.get(run.id, RunDigest())
        response.runs.append(run_message(run, digest.rounds, digest.epsilon_spent))
    return response


def run_detail(store: RunStore, run_id: int) -> tuple[pb.Run, pb.ListRoundsResponse] | None:
    """A run and its rounds from one read of the rounds (a run page), or None if no such run."""
    run = store.run(run_id)
    if run is None:
        return None
    rounds = store.rounds(run_id)
    return run_message(run, rounds), pb.ListRoundsResponse(
        rounds=[round_message(r) for r in rounds]
    )


def rounds_response(store: RunStore, run_id: int) -> pb.ListRoundsResponse:
    """A run's rounds: the admin API's ListRounds and the dashboard's /api/runs/N/rounds."""
    return pb.ListRoundsResponse(rounds=[round_message(r) for r in store.rounds(run_id)])


def participation_message(p: Participation) -> pb.Participation:
    optional = ("epsilon_record", "epsilon_enterprise", "num_examples", "train_loss")
    optional += ("heldout_loss_before", "eval_loss", "update_norm", "duration_s")
    return pb.Participation(
        enterprise=p.enterprise or "",
        node_id=p.node_id,
        status=p.status,
        error=p.error or "",
        **{k: getattr(p, k) for k in optional if getattr(p, k) is not None},
    )


def round_message(r: Round) -> pb.Round:
    optional = ("train_loss", "eval_loss", "server_eval_loss", "update_norm", "updates_seen")
    return pb.Round(
        number=r.number,
        status=r.status,
        started_at=_time(r.started_at),
        ended_at=_time(r.ended_at),
        participants=r.participants,
        failures=r.failures,
        bytes_up=r.bytes_up,
        bytes_down=r.bytes_down,
        checkpoint_path=r.checkpoint_path or "",
        checkpoint_sha256=r.checkpoint_sha256 or "",
        expert_load_json=json.dumps(r.expert_load) if r.expert_load else "",
        participations=[participation_message(p) for p in r.participations],
        **{k: getattr(r, k) for k in optional if getattr(r, k) is not None},
    )


def _audit_fields(audit: dict | None) -> dict:
    if not audit:
        return {}
    return {
        "audit_epsilon_lower_bound": audit["epsilon_lower_bound"],
        "audit_confidence": audit["confidence"],
        **{f"audit_{k}": audit[k] for k in ("canaries", "guesses", "correct")},
    }


def privacy_ledger_message(store: RunStore, run_id: int | None) -> pb.PrivacyLedger:
    ledger = pb.PrivacyLedger()
    seen: set[int] = set()
    for run, number, p in store.privacy_ledger(run_id):
        if run.id not in seen:
            seen.add(run.id)
            plan = run.privacy_plan or {}
            record, entp = plan.get("record") or {}, plan.get("enterprise") or {}
            ledger.runs.append(
                pb.RunPrivacy(
                    run_id=run.id,
                    status=run.status,
                    secure_aggregation=bool(plan.get("secure_aggregation")),
                    enterprise_mechanism=entp.get("mechanism", ""),
                    enterprise_adjacency=entp.get("adjacency", "zero-out" if entp else ""),
                    **_audit_fields(run.audit),
                    **{f"record_{k}": record[k] for k in ("epsilon", "delta") if k in record},
                    **{f"enterprise_{k}": entp[k] for k in ("epsilon", "delta") if k in entp},
                )
            )
        epsilons = {
            f"epsilon_{level}": getattr(p, f"epsilon_{level}")
            for level in ("record", "enterprise")
            if getattr(p, f"epsilon_{level}") is not None
        }
        ledger.entries.append(
            pb.LedgerEntry(
                run_id=run.id,
                round=number,
                enterprise=p.enterprise or p.node_id,
                status=p.status,
                note=p.error or "",
                **epsilons,
            )
        )
    return ledger


def node_message(node: Node, online: bool) -> pb.Node:
    return pb.Node(
        enterprise=node.enterprise,
        public_key=node.public_key,
        fingerprint=node.fingerprint,
        flower_node_id=node.flower_node_id,
        status="revoked" if node.revoked_at else "active",
        online=online and node.revoked_at is None,
        registered_at=_time(node.registered_at),
        revoked_at=_time(node.revoked_at),
        registered_by=node.registered_by or "",
    )
