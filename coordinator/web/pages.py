"""The dashboard's pages as HTML, rendered from the admin API's own messages (store/views.py).

Every page is a function of `pb` messages, so the dashboard, its JSON API and `fedmoe report`
show the numbers the admin API serves, computed once. Each chart comes with its numbers: a
table a click away, and CSV and JSON downloads of the same rows (`chart_tables`).
"""

from __future__ import annotations

import base64
import csv
import datetime as dt
import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from html import escape
from importlib import resources

from fedmoe.coordinator.web.charts import LineChart, Rule, Series, heatmap, line_chart
from fedmoe.proto import admin_pb2 as pb

LIVE_STATUSES = ("queued", "running")
POLL_S = 3  # how often a page with a live run fetches itself again


@dataclass(frozen=True)
class Table:
    """A chart's numbers: what its table shows and its CSV/JSON downloads hold."""

    columns: list[str]
    rows: list[list]

    def csv(self) -> str:
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(self.columns)
        writer.writerows(["" if v is None else v for v in row] for row in self.rows)
        return out.getvalue()

    def json(self) -> str:
        return json.dumps([dict(zip(self.columns, row, strict=True)) for row in self.rows])


def _num(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _opt(message, name: str):
    """A proto3 `optional` field's value, or None when unset."""
    return getattr(message, name) if message.HasField(name) else None


def _seconds(r: pb.Round) -> float | None:
    if not (r.started_at and r.ended_at):
        return None
    start, end = dt.datetime.fromisoformat(r.started_at), dt.datetime.fromisoformat(r.ended_at)
    return round((end - start).total_seconds(), 3)


# --- what a run's charts show ----------------------------------------------------------------
def chart_tables(run: pb.Run, rounds: list[pb.Round]) -> dict:
    """Every chart of the run page, as the table of numbers it draws."""
    enterprises = sorted({p.enterprise for r in rounds for p in r.participations if p.enterprise})
    by_round = {r.number: {p.enterprise: p for p in r.participations} for r in rounds}
    loss_columns = ["round", "status", "train_loss", "server_eval_loss", "eval_loss"]
    loss_rows = []
    for r in rounds:
        held = [
            _opt(by_round[r.number][e], "eval_loss") if e in by_round[r.number] else None
            for e in enterprises
        ]
        loss_rows.append(
            [
                r.number,
                r.status,
                _opt(r, "train_loss"),
                _opt(r, "server_eval_loss"),
                _opt(r, "eval_loss"),
                *held,
            ]
        )
    loss_columns += [f"heldout_loss:{e}" for e in enterprises]
    levels = [
        lv
        for lv in ("record", "enterprise")
        if any(_opt(p, f"epsilon_{lv}") is not None for r in rounds for p in r.participations)
    ]
    eps_rows = [
        [
            r.number,
            e,
            lv,
            _opt(by_round[r.number][e], f"epsilon_{lv}"),
            _opt(run, f"{lv}_epsilon_target"),
        ]
        for r in rounds
        for e in enterprises
        if e in by_round[r.number]
        for lv in levels
    ]
    cost_rows = [
        [r.number, r.status, _seconds(r), r.bytes_up, r.bytes_down, r.participants, r.failures]
        for r in rounds
    ]
    failed_rows = [
        [r.number, p.enterprise or p.node_id, p.status, p.error]
        for r in rounds
        for p in r.participations
        if p.status != "ok"
    ]
    load = _expert_load(rounds)
    return {
        "loss": Table(loss_columns, loss_rows),
        "epsilon": Table(["round", "enterprise", "level", "epsilon", "target"], eps_rows),
        "cost": Table(
            ["round", "status", "seconds", "bytes_up", "bytes_down", "participants", "failures"],
            cost_rows,
        ),
        "failures": Table(["round", "enterprise", "status", "reason"], failed_rows),
        "expert_load": Table(
            ["layer", "expert", "tokens"],
            [[layer, e, n] for layer, counts in load for e, n in enumerate(counts)],
        ),
    }


def _expert_load(rounds: list[pb.Round]) -> list[tuple[str, list[int]]]:
    """Tokens per expert per layer, summed over committed rounds (under SecAgg+ the coordinator
    only ever holds these sums)."""
    total: dict[str, list[int]] = {}
    for r in rounds:
        if r.status != "completed" or not r.expert_load_json:
            continue
        for layer, counts in json.loads(r.expert_load_json).items():
            row = total.setdefault(layer, [0] * len(counts))
            row[: len(counts)] = [a + b for a, b in zip(row, counts, strict=False)]
    return sorted(total.items(), key=lambda item: int(item[0]) if item[0].isdigit() else item[0])


def _charts(run: pb.Run, tables: dict) -> dict[str, str]:
    loss = tables["loss"]
    cols = loss.columns
    series = []
    for name, label, dashed in (
        ("train_loss", "train loss", False),
        ("server_eval_loss", "server eval", False),
        ("eval_loss", "federated eval", False),
    ):
        i = cols.index(name)
        if any(row[i] is not None for row in loss.rows):
            series.append(Series(label, [(row[0], row[i]) for row in loss.rows], dashed))
    for i, name in enumerate(cols):
        if name.startswith("heldout_loss:"):
            points = [(row[0], row[i]) for row in loss.rows]
            series.append(Series(f"held-out {name.split(':', 1)[1]}", points, dashed=True))
    rules = []
    if _opt(run, "base_eval_loss") is not None:
        rules.append(Rule("base model (server eval)", run.base_eval_loss))
    elif _opt(run, "result_base_loss") is not None:
        rules.append(Rule("base model (held-out)", run.result_base_loss))
    eps = tables["epsilon"]
    eps_series: dict[tuple[str, str], list] = {}
    targets: dict[str, float] = {}
    for number, enterprise, level, epsilon, target in eps.rows:
        eps_series.setdefault((enterprise, level), []).append((number, epsilon))
        if target is not None:
            targets[level] = target
    cost = tables["cost"]
    return {
        "loss": line_chart(
            LineChart("loss per round", "round", "loss", series, rules), "chart-loss"
        ),
        "epsilon": line_chart(
            LineChart(
                "epsilon spent per enterprise",
                "round",
                "epsilon",
                [Series(f"{e} ({lv})", pts) for (e, lv), pts in eps_series.items()],
                [Rule(f"{lv}-level target", t) for lv, t in targets.items()],
            ),
            "chart-epsilon",
            "no epsilon spent yet"
            if run.privacy and not run.privacy.startswith("privacy OFF")
            else "privacy off: this run spends no epsilon",
        ),
        "cost": line_chart(
            LineChart(
                "round time",
                "round",
                "seconds",
                [Series("round time", [(row[0], row[2]) for row in cost.rows])],
            ),
            "chart-cost",
        ),
        "expert_load": heatmap(
            "expert load per layer", _expert_rows(tables["expert_load"]), "chart-expert-load"
        ),
    }


def _expert_rows(table: Table) -> list[tuple[str, list[int]]]:
    rows: dict[str, list[int]] = {}
    for layer, _, tokens in table.rows:
        rows.setdefault(layer, []).append(tokens)
    return list(rows.items())


# --- pages -----------------------------------------------------------------------------------
def _asset(name: str) -> str:
    return resources.files("fedmoe.coordinator.web").joinpath("static", name).read_text()


def layout(title: str, body: str, *, user: str | None, live: bool, standalone: bool = False) -> str:
    """A page: the dashboard's (assets from /static; a menu once signed in) or a standalone
    report (its style inline, no script, nothing to fetch)."""
    if standalone:
        head = f"<style>{_asset('dashboard.css')}</style>"
    else:
        head = (
            '<link rel="stylesheet" href="/static/dashboard.css">'
            '<script src="/static/live.js" defer></script>'
        )
    nav = ""
    if user is not None and not standalone:
        who = f'<span class="who">{escape(user)}</span> <a href="/signout">sign out</a>'
        nav = f'<nav><a href="/runs">Runs</a> <a href="/nodes">Nodes</a> {who}</nav>'
    live_attr = f' data-live="{POLL_S}"' if live else ""
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<link rel="icon" href="data:,">'  # no favicon request
        f"<title>{escape(title)} · fedmoe</title>{head}</head><body>"
        f'<header><span class="brand">fedmoe</span>{nav}</header>'
        f"<main{live_attr}><h1>{escape(title)}</h1>{body}</main></body></html>"
    )


def _status(status: str) -> str:
    return f'<span class="status status-{escape(status)}">{escape(status)}</span>'


def _privacy_cell(run: pb.Run) -> str:
    """Per level: the most any enterprise spent so far, of the run's target."""
    parts = [
        f"{level} ε {_num(_opt(run, f'{level}_epsilon_spent'), 3)} of "
        f"{_num(_opt(run, f'{level}_epsilon_target'), 3)}"
        for level in ("record", "enterprise")
        if _opt(run, f"{level}_epsilon_target") is not None
    ]
    return "; ".join(parts) or ("off" if run.privacy.startswith("privacy OFF") else "-")


def _result(run: pb.Run) -> str:
    if not run.result_basis:
        return "-"
    best, base = _opt(run, "best_eval_loss"), _opt(run, "result_base_loss")
    if run.best_round and best is not None and base:
        return f"round {run.best_round}: {best:.4f} vs base {base:.4f} ({(base - best) / base:.1%} lower)"
    return f"base model ({_num(base)}): no round beat it"


def runs_page(runs: pb.ListRunsResponse, user: str) -> str:
    rows = []
    for run in reversed(runs.runs):  # newest first
        privacy = _privacy_cell(run)
        rows.append(
            f'<tr data-run="{run.id}"><td><a href="/runs/{run.id}">{run.id}</a></td>'
            f"<td>{_status(run.status)}</td><td>{escape(run.started_by or '-')}</td>"
            f'<td class="rounds">{run.completed_rounds} / {run.planned_rounds}</td>'
            f"<td>{escape(_result(run))}</td><td>{escape(privacy)}</td>"
            f"<td>{escape(run.started_at[:19].replace('T', ' '))}</td></tr>"
        )
    table = (
        '<table id="runs"><thead><tr><th>run</th><th>status</th><th>started by</th>'
        "<th>rounds done / planned</th><th>result vs base</th><th>privacy: ε spent of plan</th>"
        f"<th>started (UTC)</th></tr></thead><tbody>{''.join(rows)}</tbody></table>"
    )
    if not runs.runs:
        table = '<p class="empty">No runs yet: `fedmoe admin start` starts one.</p>'
    live = any(r.status in LIVE_STATUSES for r in runs.runs)
    return layout("Runs", table, user=user, live=live)


def _table_html(table: Table, table_id: str) -> str:
    head = "".join(f"<th>{escape(c)}</th>" for c in table.columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in row) + "</tr>" for row in table.rows
    )
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.6g}"
    return escape(str(value))


def _figure(name: str, title: str, svg: str, table: Table, link: Callable[[str, str], str]) -> str:
    return (
        f'<figure id="figure-{name}"><figcaption>{escape(title)}</figcaption>{svg}'
        f"<details><summary>numbers</summary>{_table_html(table, f'table-{name}')}</details>"
        f'<p class="downloads">{link(name, "csv")} {link(name, "json")}</p></figure>'
    )


def run_page(
    run: pb.Run,
    rounds: pb.ListRoundsResponse,
    ledger: pb.PrivacyLedger,
    user: str | None,
    standalone: bool = False,
) -> str:
    """One run: curves, epsilon, cost, failures, the audit, expert load. `standalone`: a
    self-contained report (downloads as data: links)."""
    privacy = next((p for p in ledger.runs if p.run_id == run.id), None)
    tables = chart_tables(run, list(rounds.rounds))
    charts = _charts(run, tables)

    def link(name: str, fmt: str) -> str:
        body = tables[name].csv() if fmt == "csv" else tables[name].json()
        if standalone:
            kind = "text/csv" if fmt == "csv" else "application/json"
            href = f"data:{kind};base64,{base64.b64encode(body.encode()).decode()}"
        else:
            href = f"/runs/{run.id}/data/{name}.{fmt}"
        return f'<a download="run-{run.id}-{name}.{fmt}" href="{href}">{fmt.upper()}</a>'

    summary = (
        f'<dl class="summary"><dt>status</dt><dd id="run-status">{_status(run.status)}</dd>'
        f'<dt>rounds</dt><dd id="run-rounds">{run.completed_rounds} / {run.planned_rounds}</dd>'
        f"<dt>started by</dt><dd>{escape(run.started_by or '-')}</dd>"
        f"<dt>engine</dt><dd>{escape(run.engine)}</dd>"
        f"<dt>enterprises</dt><dd>{escape(', '.join(run.enterprises))}</dd>"
        f"<dt>result</dt><dd>{escape(_result(run))}</dd>"
        f"<dt>chosen by</dt><dd>{escape(run.result_basis or '-')}</dd>"
        f"<dt>privacy</dt><dd>{escape(run.privacy)}</dd>"
        + (f"<dt>note</dt><dd>{escape(run.error)}</dd>" if run.error else "")
        + "</dl>"
    )
    audit = ""
    if privacy is not None and privacy.HasField("audit_epsilon_lower_bound"):
        claim = _opt(privacy, "record_epsilon") or _opt(privacy, "enterprise_epsilon")
        audit = (
            '<section id="audit"><h2>One-run audit</h2><p>'
            f"epsilon lower bound <b>{privacy.audit_epsilon_lower_bound:.3f}</b> "
            f"({privacy.audit_confidence:.0%} confidence; {privacy.audit_correct} of "
            f"{privacy.audit_guesses} guesses right over {privacy.audit_canaries} canaries) "
            f"beside the claim <b>{_num(claim, 3)}</b>: "
            + (
                "the audit does not refute the claim"
                if claim is None or privacy.audit_epsilon_lower_bound <= claim
                else "<b>the audit REFUTES the claim</b>"
            )
            + "</p></section>"
        )
    failures = tables["failures"]
    failed = (
        '<section id="failures"><h2>Failed participations</h2>'
        + (_table_html(failures, "table-failures") if failures.rows else "<p>none</p>")
        + "</section>"
    )
    body = (
        summary
        + _figure(
            "loss",
            "Loss per round (dashed: each enterprise's held-out loss)",
            charts["loss"],
            tables["loss"],
            link,
        )
        + _figure(
            "epsilon",
            "Epsilon spent per enterprise, against the run's target",
            charts["epsilon"],
            tables["epsilon"],
            link,
        )
        + _figure("cost", "Round time and bytes", charts["cost"], tables["cost"], link)
        + failed
        + audit
        + _figure(
            "expert_load",
            "Expert load per layer (tokens, summed over committed rounds)",
            charts["expert_load"],
            tables["expert_load"],
            link,
        )
    )
    live = run.status in LIVE_STATUSES and not standalone
    return layout(f"Run {run.id}", body, user=user, live=live, standalone=standalone)


def nodes_page(nodes: list[pb.Node], user: str) -> str:
    rows = "".join(
        f'<tr data-enterprise="{escape(n.enterprise)}"><td>{escape(n.enterprise)}</td>'
        f"<td>{_status(n.status)}</td>"
        f"<td>{'online' if n.online else 'offline'}</td>"
        f"<td><code>{escape(n.fingerprint)}</code></td><td>{escape(n.flower_node_id or '-')}</td>"
        f"<td>{escape(n.registered_at[:19].replace('T', ' '))} by {escape(n.registered_by or '-')}</td>"
        f"<td>{escape(n.revoked_at[:19].replace('T', ' ') or '-')}</td></tr>"
        for n in nodes
    )
    table = (
        '<table id="nodes"><thead><tr><th>enterprise</th><th>key</th><th>connection</th>'
        "<th>key fingerprint</th><th>Flower node</th><th>registered (UTC)</th><th>revoked</th>"
        f"</tr></thead><tbody>{rows}</tbody></table>"
    )
    if not nodes:
        table = '<p class="empty">No enterprise registered: `fedmoe admin register` adds one.</p>'
    return layout("Nodes", table, user=user, live=True)


def signin_page(error: str = "") -> str:
    message = f'<p class="error" id="signin-error">{escape(error)}</p>' if error else ""
    form = (
        f"{message}<form method="
        '"post" action="/signin"><label>Admin token <input type="password" name="token" '
        'autocomplete="current-password" autofocus required></label> <button type="submit">'
        "Sign in</button></form><p>A token from <code>fedmoe coordinator token</code>; the "
        "coordinator keeps only its hash.</p>"
    )
    return layout("Sign in", form, user=None, live=False)
