"""Tables of runs, rounds, the privacy ledger and nodes, from the admin API's messages: the local
commands and `fedmoe admin` print the same thing."""

from __future__ import annotations

import datetime as dt
import json

from rich.table import Table

from fedmoe.proto import admin_pb2 as pb


def _num(message, name: str, digits: int = 4) -> str:
    return f"{getattr(message, name):.{digits}f}" if message.HasField(name) else "-"


def _eps(message, name: str) -> str:
    return _num(message, name, 3) if message.HasField(name) else "off"


def _seconds(start: str, end: str) -> str:
    if not start or not end:
        return "-"
    return (
        f"{(dt.datetime.fromisoformat(end) - dt.datetime.fromisoformat(start)).total_seconds():.1f}"
    )


def _short_time(value: str, with_date: bool = True) -> str:
    if not value:
        return "-"
    moment = dt.datetime.fromisoformat(value)
    return f"{moment:%Y-%m-%d %H:%M:%S}" if with_date else f"{moment:%H:%M:%S}"


def _spent(value: float | None, on: bool, target: float) -> str:
    """Epsilon spent against its target, or "off" for a level the run does not guarantee."""
    if not on:
        return "off"
    return f"{'off' if value is None else f'{value:.3f}'} / {target:g}"


def runs_table(runs: list[pb.Run], title: str) -> Table:
    table = Table(title=title)
    columns = ("run", "status", "engine", "rounds", "started", "ended", "resumes", "base")
    columns += ("result (server eval)", "error")
    for col in columns:
        table.add_column(col)
    for run in runs:
        table.add_row(
            str(run.id),
            run.status,
            run.engine,
            f"{run.completed_rounds}/{run.planned_rounds}",
            _short_time(run.started_at),
            _short_time(run.ended_at, with_date=False),
            str(run.resumes),
            (run.base_fingerprint or "-")[:12],
            run_result(run),
            run.error,
        )
    return table


def run_result(run: pb.Run) -> str:
    """What the run hands out, against the base model on the public evaluation."""
    if not (run.HasField("base_eval_loss") and run.HasField("best_eval_loss")):
        return "-"
    base, best = run.base_eval_loss, run.best_eval_loss
    if not run.best_round:
        return f"WORSE: base kept ({best:.3f} vs {base:.3f})"
    return f"round {run.best_round}: {best:.3f} vs base {base:.3f} (-{(base - best) / base:.0%})"


def load_imbalance(expert_load_json: str) -> str:
    """Per MoE layer, the busiest expert's token count over the mean: 1.0 is perfectly balanced."""
    if not expert_load_json:
        return "-"
    load = json.loads(expert_load_json)
    layers = sorted(load.items(), key=lambda kv: int(kv[0]))
    return " ".join(f"L{layer}:{max(c) / (sum(c) / len(c)):.2f}" for layer, c in layers if sum(c))


def rounds_table(run_id: int, rounds: list[pb.Round]) -> Table:
    table = Table(title=f"run {run_id}")
    columns = ("round", "status", "clients", "train loss", "eval loss", "server eval")
    columns += ("update norm", "KiB up", "KiB down", "expert load max/mean", "seconds")
    for col in columns:
        table.add_column(col)
    for r in rounds:
        table.add_row(
            str(r.number),
            r.status,
            f"{r.participants}/{r.participants + r.failures}",
            _num(r, "train_loss"),
            _num(r, "eval_loss"),
            _num(r, "server_eval_loss"),
            _num(r, "update_norm"),
            f"{r.bytes_up / 1024:.0f}",
            f"{r.bytes_down / 1024:.0f}",
            load_imbalance(r.expert_load_json),
            _seconds(r.started_at, r.ended_at),
        )
    return table


def participation_table(rounds: list[pb.Round]) -> Table:
    table = Table(title="participation")
    columns = ("round", "enterprise", "node", "status", "examples", "train loss")
    columns += ("held-out before", "held-out after", "update norm", "seconds", "error")
    for col in columns:
        table.add_column(col)
    for r in rounds:
        for p in r.participations:
            table.add_row(
                str(r.number),
                p.enterprise or "-",
                p.node_id[:10],
                p.status,
                str(p.num_examples) if p.HasField("num_examples") else "-",
                _num(p, "train_loss"),
                _num(p, "heldout_loss_before"),
                _num(p, "eval_loss"),
                _num(p, "update_norm"),
                _num(p, "duration_s", 1),
                p.error,
            )
    return table


def privacy_tables(ledger: pb.PrivacyLedger, per_round: bool) -> list[Table]:
    """Per run and enterprise: the largest epsilon spent against the target; then every round."""
    runs = Table(title="privacy per run (epsilon per enterprise: spent / target)")
    columns = ("run", "status", "record level", "enterprise level", "secure agg", "enterprise")
    for col in (*columns, "record eps", "enterprise eps", "rounds in"):
        runs.add_column(col)
    plans = {r.run_id: r for r in ledger.runs}
    spent: dict[tuple[int, str], dict] = {}
    for e in ledger.entries:
        entry = spent.setdefault(
            (e.run_id, e.enterprise), {"record": None, "enterprise": None, "rounds": 0}
        )
        if e.status == "refused":
            continue
        entry["rounds"] += 1  # charged: it accepted the round, so its update may have been released
        for level in ("record", "enterprise"):
            if e.HasField(f"epsilon_{level}"):
                entry[level] = max(entry[level] or 0.0, getattr(e, f"epsilon_{level}"))
    for (run_id, enterprise), entry in spent.items():
        plan = plans[run_id]
        has_record, has_entp = plan.HasField("record_epsilon"), plan.HasField("enterprise_epsilon")

        runs.add_row(
            str(run_id),
            plan.status,
            f"eps {plan.record_epsilon:g} delta {plan.record_delta:g}" if has_record else "off",
            f"{plan.enterprise_mechanism} eps {plan.enterprise_epsilon:g} ({plan.enterprise_adjacency})"
            if has_entp
            else "off",
            "on" if plan.secure_aggregation else "off",
            enterprise,
            _spent(entry["record"], has_record, plan.record_epsilon),
            _spent(entry["enterprise"], has_entp, plan.enterprise_epsilon),
            str(entry["rounds"]),
        )
    tables = [runs]
    audited = [r for r in ledger.runs if r.HasField("audit_epsilon_lower_bound")]
    if audited:
        audit = Table(title="one-run privacy audit (record level; Steinke, Nasr, Jagielski 2023)")
        for col in (
            "run",
            "claimed eps",
            "audited eps >=",
            "confidence",
            "canaries",
            "right guesses",
        ):
            audit.add_column(col)
        for r in audited:
            audit.add_row(
                str(r.run_id),
                f"{r.record_epsilon:g}" if r.HasField("record_epsilon") else "none",
                f"{r.audit_epsilon_lower_bound:.3f}",
                f"{r.audit_confidence:.0%}",
                str(r.audit_canaries),
                f"{r.audit_correct} of {r.audit_guesses}",
            )
        tables.append(audit)
    if per_round:
        table = Table(title="privacy per round (the run's epsilon after the round)")
        for col in ("run", "round", "enterprise", "status", "record eps", "enterprise eps", "note"):
            table.add_column(col)
        for e in ledger.entries:
            table.add_row(
                str(e.run_id),
                str(e.round),
                e.enterprise,
                e.status,
                _eps(e, "epsilon_record"),
                _eps(e, "epsilon_enterprise"),
                e.note,
            )
        tables.append(table)
    return tables


def nodes_table(nodes: list[pb.Node]) -> Table:
    table = Table(title="enterprise nodes")
    for col in (
        "enterprise",
        "status",
        "online",
        "key fingerprint",
        "flower node",
        "registered",
        "revoked",
    ):
        table.add_column(col)
    for n in nodes:
        table.add_row(
            n.enterprise,
            n.status,
            "yes" if n.online else "no",
            n.fingerprint,
            n.flower_node_id,
            _short_time(n.registered_at),
            _short_time(n.revoked_at),
        )
    return table
