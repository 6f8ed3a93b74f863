"""Runs, rounds, the privacy ledger and nodes, as rows and as tables, from the admin API's messages:
the local commands and `fedmoe admin` print the same thing. Each listing is computed once, as rows
of plain values (the `*_rows` functions); a table formats those rows and `--json` prints them.

`--json` prints one JSON document to stdout and nothing else (errors go to stderr, exit code as
without `--json`). Field names are stable; new fields may be added, none is renamed or removed.
Times are ISO 8601 in UTC (null: not yet known); losses and epsilons are numbers, null where the
table shows `-` or `off`; Flower node ids are strings (uint64).

`fedmoe runs`, `fedmoe admin runs`, `fedmoe admin run RUN`: {"runs": [run, ...]}
  run: run_id, status, engine, completed_rounds, planned_rounds, started_at, ended_at, resumes,
    base_fingerprint, base_eval_loss, result_basis, result_base_loss, best_round_loss,
    result_round, result_gain, enterprises, started_by, privacy, error
    - base_eval_loss: the base model's loss on the public server evaluation (null: none)
    - result_basis: the evaluation the run's result is chosen by, "server eval" or
      "enterprises' held-out loss" (null: none yet, or none in this run: the result is then its
      last committed round); result_base_loss and best_round_loss: the base model's loss and the
      best committed round's on it
    - result_round: the round whose adapter is the run's result (`generate`/`export` use it);
      null when the base model is the result (no round beat it) or there is no evaluation
    - result_gain: how much lower the result's loss is than the base model's, as a fraction
      (0.165 is the run's "16.5% lower"); 0 when the base model is the result
    - privacy: the run's promise in one line, as the run printed it

`fedmoe rounds RUN`, `fedmoe admin rounds RUN`: {"run_id": N, "rounds": [round, ...]}
  round: number, status, started_at, ended_at, duration_s, participants, failures, train_loss,
    eval_loss, server_eval_loss, update_norm, bytes_up, bytes_down, updates_seen,
    expert_load (per MoE layer, tokens routed to each expert), expert_load_imbalance (per layer,
    the busiest expert's count over the mean), checkpoint_path, checkpoint_sha256, participations
  participation (always included; `--clients` only adds the table): enterprise, node_id,
    status, num_examples, train_loss, heldout_loss_before, eval_loss, update_norm, duration_s,
    epsilon_record, epsilon_enterprise, error

`fedmoe privacy [RUN]`, `fedmoe admin ledger [RUN]`: {"runs": [...], "spent": [...], "rounds": [...]}
  runs (each run's promise): run_id, status, secure_aggregation, record_epsilon, record_delta,
    enterprise_mechanism, enterprise_epsilon, enterprise_delta, enterprise_adjacency (null or
    "": that level is off), audit (null, or epsilon_lower_bound, confidence, canaries, guesses,
    correct)
  spent (per run and enterprise): run_id, enterprise, record_epsilon, enterprise_epsilon (the
    largest the run reached; null: none spent at that level), rounds_charged
  rounds (always included; `--rounds` only adds the table): run_id, round, enterprise, status,
    epsilon_record, epsilon_enterprise, note

`fedmoe admin nodes list`: {"nodes": [node, ...]}
  node: enterprise, status, online, state ("ready": its agent passed its own checks of data,
    ledger and key, and is connected; "not connected": the agent's own log says why, to its
    operator only; "revoked"), fingerprint, flower_node_id, public_key, registered_at,
    revoked_at, registered_by

`fedmoe agent ledger FILE`: see cli/agent.py.

Flower node ids are printed in full everywhere: they are what Flower's own logs name a node by.
"""

from __future__ import annotations

import datetime as dt
import json

from rich.table import Table

from fedmoe.cli.common import console, print_json
from fedmoe.proto import admin_pb2 as pb


def _opt(message, name: str):
    """An optional proto field's value, or None when unset."""
    return getattr(message, name) if message.HasField(name) else None


def _fmt(value: float | None, digits: int = 4, none: str = "-") -> str:
    return none if value is None else f"{value:.{digits}f}"


def _seconds(start: str, end: str) -> float | None:
    if not start or not end:
        return None
    return (dt.datetime.fromisoformat(end) - dt.datetime.fromisoformat(start)).total_seconds()


def _short_time(value: str | None, with_date: bool = True) -> str:
    if not value:
        return "-"
    moment = dt.datetime.fromisoformat(value)
    return f"{moment:%Y-%m-%d %H:%M:%S}" if with_date else f"{moment:%H:%M:%S}"


def _table(title: str, columns: tuple[str, ...], rows: list[tuple]) -> Table:
    table = Table(title=title)
    for col in columns:
        table.add_column(col)
    for row in rows:
        table.add_row(*row)
    return table


# --- runs ---------------------------------------------------------------------------------------
def run_row(run: pb.Run) -> dict:
    from fedmoe.coordinator.store.outcome import Outcome

    base, best = _opt(run, "result_base_loss"), _opt(run, "best_eval_loss")
    gain = None
    if base is not None and best is not None:
        # The run's own formula (its final line says "x% lower"): one number, one meaning.
        gain = Outcome(base, run.best_round, best, best).gain if run.best_round else 0.0
    return {
        "run_id": run.id,
        "status": run.status,
        "engine": run.engine,
        "completed_rounds": run.completed_rounds,
        "planned_rounds": run.planned_rounds,
        "started_at": run.started_at or None,
        "ended_at": run.ended_at or None,
        "resumes": run.resumes,
        "base_fingerprint": run.base_fingerprint or None,
        "base_eval_loss": _opt(run, "base_eval_loss"),
        "result_basis": run.result_basis or None,
        "result_base_loss": base,
        "best_round_loss": best,
        "result_round": run.best_round or None,
        "result_gain": gain,
        "enterprises": list(run.enterprises),
        "started_by": run.started_by or None,
        "privacy": run.privacy,
        "error": run.error,
    }


def run_rows(runs: list[pb.Run]) -> list[dict]:
    return [run_row(run) for run in runs]


def run_result(row: dict) -> str:
    """What the run hands out, against the base model on the evaluation it was chosen by, in the
    numbers and precision of the run's own final line."""
    base, best = row["result_base_loss"], row["best_round_loss"]
    if base is None or best is None:
        return "-"
    basis = "" if row["result_basis"] == "server eval" else f"; {row['result_basis']}"
    if row["result_round"] is None:
        return f"WORSE: base kept ({best:.4f} vs {base:.4f}{basis})"
    return (
        f"round {row['result_round']}: {best:.4f} vs base {base:.4f} "
        f"({row['result_gain']:.1%} lower{basis})"
    )


def runs_table(rows: list[dict], title: str) -> Table:
    columns = ("run", "status", "engine", "rounds", "started", "ended", "resumes", "base")
    columns += ("result (loss vs base model)", "error")
    return _table(
        title,
        columns,
        [
            (
                str(r["run_id"]),
                r["status"],
                r["engine"],
                f"{r['completed_rounds']}/{r['planned_rounds']}",
                _short_time(r["started_at"]),
                _short_time(r["ended_at"], with_date=False),
                str(r["resumes"]),
                (r["base_fingerprint"] or "-")[:12],
                run_result(r),
                r["error"],
            )
            for r in rows
        ],
    )


# --- rounds -------------------------------------------------------------------------------------
def load_imbalance(expert_load: dict | None) -> dict[str, float] | None:
    """Per MoE layer, the busiest expert's token count over the mean: 1.0 is perfectly balanced."""
    if not expert_load:
        return None
    layers = sorted(expert_load.items(), key=lambda kv: int(kv[0]))
    return {layer: max(c) / (sum(c) / len(c)) for layer, c in layers if sum(c)}


def participation_row(p: pb.Participation) -> dict:
    return {
        "enterprise": p.enterprise or None,
        "node_id": p.node_id,
        "status": p.status,
        "num_examples": _opt(p, "num_examples"),
        "train_loss": _opt(p, "train_loss"),
        "heldout_loss_before": _opt(p, "heldout_loss_before"),
        "eval_loss": _opt(p, "eval_loss"),
        "update_norm": _opt(p, "update_norm"),
        "duration_s": _opt(p, "duration_s"),
        "epsilon_record": _opt(p, "epsilon_record"),
        "epsilon_enterprise": _opt(p, "epsilon_enterprise"),
        "error": p.error,
    }


def round_row(r: pb.Round) -> dict:
    expert_load = json.loads(r.expert_load_json) if r.expert_load_json else None
    return {
        "number": r.number,
        "status": r.status,
        "started_at": r.started_at or None,
        "ended_at": r.ended_at or None,
        "duration_s": _seconds(r.started_at, r.ended_at),
        "participants": r.participants,
        "failures": r.failures,
        "train_loss": _opt(r, "train_loss"),
        "eval_loss": _opt(r, "eval_loss"),
        "server_eval_loss": _opt(r, "server_eval_loss"),
        "update_norm": _opt(r, "update_norm"),
        "bytes_up": r.bytes_up,
        "bytes_down": r.bytes_down,
        "updates_seen": _opt(r, "updates_seen"),
        "expert_load": expert_load,
        "expert_load_imbalance": load_imbalance(expert_load),
        "checkpoint_path": r.checkpoint_path or None,
        "checkpoint_sha256": r.checkpoint_sha256 or None,
        "participations": [participation_row(p) for p in r.participations],
    }


def round_rows(rounds: list[pb.Round]) -> list[dict]:
    return [round_row(r) for r in rounds]


def rounds_table(run_id: int, rows: list[dict]) -> Table:
    columns = ("round", "status", "clients", "train loss", "eval loss", "server eval")
    columns += ("update norm", "KiB up", "KiB down", "expert load max/mean", "seconds")
    return _table(
        f"run {run_id}",
        columns,
        [
            (
                str(r["number"]),
                r["status"],
                f"{r['participants']}/{r['participants'] + r['failures']}",
                _fmt(r["train_loss"]),
                _fmt(r["eval_loss"]),
                _fmt(r["server_eval_loss"]),
                _fmt(r["update_norm"]),
                f"{r['bytes_up'] / 1024:.0f}",
                f"{r['bytes_down'] / 1024:.0f}",
                " ".join(f"L{k}:{v:.2f}" for k, v in (r["expert_load_imbalance"] or {}).items())
                or "-",
                _fmt(r["duration_s"], 1),
            )
            for r in rows
        ],
    )


def participation_table(rows: list[dict]) -> Table:
    columns = ("round", "enterprise", "node", "status", "examples", "train loss")
    columns += ("held-out before", "held-out after", "update norm", "seconds", "error")
    return _table(
        "participation",
        columns,
        [
            (
                str(r["number"]),
                p["enterprise"] or "-",
                p["node_id"],
                p["status"],
                "-" if p["num_examples"] is None else str(p["num_examples"]),
                _fmt(p["train_loss"]),
                _fmt(p["heldout_loss_before"]),
                _fmt(p["eval_loss"]),
                _fmt(p["update_norm"]),
                _fmt(p["duration_s"], 1),
                p["error"],
            )
            for r in rows
            for p in r["participations"]
        ],
    )


# --- the privacy ledger -------------------------------------------------------------------------
def privacy_rows(ledger: pb.PrivacyLedger) -> dict:
    runs = [
        {
            "run_id": r.run_id,
            "status": r.status,
            "secure_aggregation": r.secure_aggregation,
            "record_epsilon": _opt(r, "record_epsilon"),
            "record_delta": _opt(r, "record_delta"),
            "enterprise_mechanism": r.enterprise_mechanism or None,
            "enterprise_epsilon": _opt(r, "enterprise_epsilon"),
            "enterprise_delta": _opt(r, "enterprise_delta"),
            "enterprise_adjacency": r.enterprise_adjacency or None,
            "audit": {
                "epsilon_lower_bound": r.audit_epsilon_lower_bound,
                "confidence": r.audit_confidence,
                "canaries": r.audit_canaries,
                "guesses": r.audit_guesses,
                "correct": r.audit_correct,
            }
            if r.HasField("audit_epsilon_lower_bound")
            else None,
        }
        for r in ledger.runs
    ]
    spent: dict[tuple[int, str], dict] = {}
    for e in ledger.entries:
        entry = spent.setdefault(
            (e.run_id, e.enterprise),
            {
                "run_id": e.run_id,
                "enterprise": e.enterprise,
                "record_epsilon": None,
                "enterprise_epsilon": None,
                "rounds_charged": 0,
            },
        )
        if e.status == "refused":
            continue
        entry["rounds_charged"] += 1  # it accepted the round, so its update may have been released
        for level in ("record", "enterprise"):
            if e.HasField(f"epsilon_{level}"):
                key = f"{level}_epsilon"
                entry[key] = max(entry[key] or 0.0, getattr(e, f"epsilon_{level}"))
    rounds = [
        {
            "run_id": e.run_id,
            "round": e.round,
            "enterprise": e.enterprise,
            "status": e.status,
            "epsilon_record": _opt(e, "epsilon_record"),
            "epsilon_enterprise": _opt(e, "epsilon_enterprise"),
            "note": e.note,
        }
        for e in ledger.entries
    ]
    return {"runs": runs, "spent": list(spent.values()), "rounds": rounds}


def _spent(value: float | None, target: float | None) -> str:
    """Epsilon spent against its target, or "off" for a level the run does not guarantee."""
    if target is None:
        return "off"
    return f"{_fmt(value, 3, 'off')} / {target:g}"


def privacy_tables(rows: dict, per_round: bool) -> list[Table]:
    """Per run and enterprise: the largest epsilon spent against the target; then every round."""
    plans = {r["run_id"]: r for r in rows["runs"]}
    lines = []
    for s in rows["spent"]:
        plan = plans[s["run_id"]]
        record, entp = plan["record_epsilon"], plan["enterprise_epsilon"]
        lines.append(
            (
                str(s["run_id"]),
                plan["status"],
                "off" if record is None else f"eps {record:g} delta {plan['record_delta']:g}",
                "off"
                if entp is None
                else f"{plan['enterprise_mechanism']} eps {entp:g} ({plan['enterprise_adjacency']})",
                "on" if plan["secure_aggregation"] else "off",
                s["enterprise"],
                _spent(s["record_epsilon"], record),
                _spent(s["enterprise_epsilon"], entp),
                str(s["rounds_charged"]),
            )
        )
    columns = ("run", "status", "record level", "enterprise level", "secure agg", "enterprise")
    tables = [
        _table(
            "privacy per run (epsilon per enterprise: spent / target)",
            (*columns, "record eps", "enterprise eps", "rounds in"),
            lines,
        )
    ]
    audited = [r for r in rows["runs"] if r["audit"] is not None]
    if audited:
        tables.append(
            _table(
                "one-run privacy audit (record level; Steinke, Nasr, Jagielski 2023)",
                ("run", "claimed eps", "audited eps >=", "confidence", "canaries", "right guesses"),
                [
                    (
                        str(r["run_id"]),
                        "none" if r["record_epsilon"] is None else f"{r['record_epsilon']:g}",
                        f"{r['audit']['epsilon_lower_bound']:.3f}",
                        f"{r['audit']['confidence']:.0%}",
                        str(r["audit"]["canaries"]),
                        f"{r['audit']['correct']} of {r['audit']['guesses']}",
                    )
                    for r in audited
                ],
            )
        )
    if per_round:
        tables.append(
            _table(
                "privacy per round (the run's epsilon after the round)",
                ("run", "round", "enterprise", "status", "record eps", "enterprise eps", "note"),
                [
                    (
                        str(e["run_id"]),
                        str(e["round"]),
                        e["enterprise"],
                        e["status"],
                        _fmt(e["epsilon_record"], 3, "off"),
                        _fmt(e["epsilon_enterprise"], 3, "off"),
                        e["note"],
                    )
                    for e in rows["rounds"]
                ],
            )
        )
    return tables


# --- nodes --------------------------------------------------------------------------------------
def node_state(status: str, online: bool) -> str:
    """An agent connects only once its own checks pass (data, ledger, key): connected is ready.
    Why one is not stays on the node, with its operator."""
    if status == "revoked":
        return "revoked"
    return "ready" if online else "not connected"


def node_rows(nodes: list[pb.Node]) -> list[dict]:
    return [
        {
            "enterprise": n.enterprise,
            "status": n.status,
            "online": n.online,
            "state": node_state(n.status, n.online),
            "fingerprint": n.fingerprint,
            "flower_node_id": n.flower_node_id,
            "public_key": n.public_key,
            "registered_at": n.registered_at or None,
            "revoked_at": n.revoked_at or None,
            "registered_by": n.registered_by or None,
        }
        for n in nodes
    ]


def nodes_table(rows: list[dict]) -> Table:
    columns = ("enterprise", "status", "state", "key fingerprint", "flower node")
    return _table(
        "enterprise nodes",
        (*columns, "registered", "revoked"),
        [
            (
                n["enterprise"],
                n["status"],
                n["state"],
                n["fingerprint"],
                n["flower_node_id"],
                _short_time(n["registered_at"]),
                _short_time(n["revoked_at"]),
            )
            for n in rows
        ],
    )


# --- printing: a table, or with --json the rows ---------------------------------------------------
def print_runs(args, rows: list[dict], title: str) -> None:
    if args.json:
        print_json({"runs": rows})
    else:
        console.print(runs_table(rows, title))


def print_rounds(args, run_id: int, rows: list[dict]) -> None:
    if args.json:
        print_json({"run_id": run_id, "rounds": rows})
        return
    console.print(rounds_table(run_id, rows))
    if args.clients:
        console.print(participation_table(rows))


def print_privacy(args, rows: dict) -> None:
    if args.json:
        print_json(rows)
        return
    for table in privacy_tables(rows, args.rounds):
        console.print(table)


def print_nodes(args, rows: list[dict]) -> None:
    if args.json:
        print_json({"nodes": rows})
        return
    console.print(nodes_table(rows))
    if any(n["state"] == "not connected" for n in rows):
        console.print(
            "not connected: an agent that is down or refused to start (its data, ledger or key) "
            "tells only its own operator why, in its log",
            highlight=False,
        )
