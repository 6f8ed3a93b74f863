"""Charts as inline SVG, drawn on the server from numbers we already hold.

No charting library: the dashboard and `fedmoe report` need lines over rounds and one heatmap,
and a hundred lines of SVG keep every page free of third-party scripts (nothing to vendor, audit
or load from the internet) and make a report one self-contained file. Every mark carries its
value in a <title> (hover) and in `data-` attributes; the numbers themselves sit in a table
beside each chart (web/pages.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from html import escape

# Okabe-Ito: tells lines apart for readers with colour-vision deficiencies too.
PALETTE = ("#0072b2", "#e69f00", "#009e73", "#d55e00", "#cc79a7", "#56b4e9", "#f0e442", "#000000")
WIDTH, HEIGHT = 640, 260
LEFT, RIGHT, TOP, BOTTOM = 56, 180, 14, 34  # margins: axis labels left and below, legend right


@dataclass(frozen=True)
class Series:
    name: str
    points: list[tuple[float, float]]  # (x, y), in x order; y may be missing (None) for a gap
    dashed: bool = False


@dataclass(frozen=True)
class Rule:
    """A horizontal reference line: the base model's loss, an epsilon target."""

    name: str
    y: float


@dataclass
class LineChart:
    title: str
    x_label: str
    y_label: str
    series: list[Series] = field(default_factory=list)
    rules: list[Rule] = field(default_factory=list)


def nice_ticks(low: float, high: float, count: int = 5, whole: bool = False) -> list[float]:
    """Round tick values covering [low, high] (1, 2 or 5 times a power of ten apart; at least
    1 apart if `whole`, for round numbers)."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return [0.0]
    if high <= low:
        high = low + (abs(low) or 1.0)
    raw = (high - low) / max(count - 1, 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    step = max(step, 1.0) if whole else step
    first = math.floor(low / step) * step
    ticks, value = [], first
    while value <= high + step * 1e-9:
        ticks.append(round(value, 12))
        value += step
    if ticks[-1] < high:
        ticks.append(round(value, 12))
    return ticks


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def line_chart(chart: LineChart, chart_id: str, empty: str = "nothing to plot yet") -> str:
    """An SVG line chart; without a point, it says `empty`."""
    xs = [x for s in chart.series for x, y in s.points if y is not None]
    ys = [y for s in chart.series for _, y in s.points if y is not None] + [
        r.y for r in chart.rules
    ]
    label = escape(chart.title)
    head = (
        f'<svg class="chart" id="{chart_id}" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
        f'aria-label="{label}" xmlns="http://www.w3.org/2000/svg">'
    )
    if not xs:
        return f'{head}<text x="{WIDTH / 2}" y="{HEIGHT / 2}" text-anchor="middle" class="empty">{escape(empty)}</text></svg>'
    whole = all(float(x).is_integer() for x in xs)
    x_ticks = nice_ticks(min(xs), max(xs), whole=whole) if max(xs) > min(xs) else [min(xs)]
    y_ticks = nice_ticks(min(ys), max(ys))
    x0, x1 = (x_ticks[0], x_ticks[-1]) if len(x_ticks) > 1 else (xs[0] - 1, xs[0] + 1)
    y0, y1 = y_ticks[0], y_ticks[-1]
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def px(x: float) -> float:
        return LEFT + (x - x0) / (x1 - x0) * plot_w

    def py(y: float) -> float:
        return TOP + plot_h - (y - y0) / ((y1 - y0) or 1.0) * plot_h

    parts = [head, '<g class="axes" font-size="11">']
    for y in y_ticks:
        parts.append(
            f'<line x1="{LEFT}" x2="{LEFT + plot_w}" y1="{py(y):.1f}" y2="{py(y):.1f}" class="grid"/>'
            f'<text x="{LEFT - 6}" y="{py(y) + 4:.1f}" text-anchor="end">{_fmt(y)}</text>'
        )
    for x in x_ticks:
        parts.append(
            f'<text x="{px(x):.1f}" y="{TOP + plot_h + 16}" text-anchor="middle">{_fmt(x)}</text>'
        )
    parts.append(
        f'<text x="{LEFT + plot_w / 2}" y="{HEIGHT - 4}" text-anchor="middle">{escape(chart.x_label)}</text>'
        f'<text transform="translate(12 {TOP + plot_h / 2}) rotate(-90)" text-anchor="middle">{escape(chart.y_label)}</text>'
        "</g>"
    )
    legend_y = TOP + 4
    for rule in chart.rules:
        y = py(rule.y)
        parts.append(
            f'<line class="rule" x1="{LEFT}" x2="{LEFT + plot_w}" y1="{y:.1f}" y2="{y:.1f}" '
            f'stroke="#666" stroke-dasharray="2 3" data-series="{escape(rule.name)}" data-y="{rule.y!r}">'
            f"<title>{escape(rule.name)}: {_fmt(rule.y)}</title></line>"
        )
        parts.append(_legend(legend_y, "#666", rule.name, dashed=True))
        legend_y += 16
    drawn = [s for s in chart.series if any(y is not None for _, y in s.points)]
    for i, series in enumerate(drawn):
        color = PALETTE[i % len(PALETTE)]
        dash = ' stroke-dasharray="6 3"' if series.dashed else ""
        runs, current = [], []
        for x, y in series.points:
            if y is None:
                runs, current = runs + [current] if current else runs, []
            else:
                current.append((x, y))
        runs = runs + [current] if current else runs
        for run in runs:
            path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in run)
            parts.append(
                f'<polyline fill="none" stroke="{color}" stroke-width="2"{dash} points="{path}"/>'
            )
        for x, y in series.points:
            if y is None:
                continue
            parts.append(
                f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="{color}" '
                f'data-series="{escape(series.name)}" data-x="{x!r}" data-y="{y!r}">'
                f"<title>{escape(series.name)}, {escape(chart.x_label)} {_fmt(x)}: {_fmt(y)}</title></circle>"
            )
        parts.append(_legend(legend_y, color, series.name, series.dashed))
        legend_y += 16
    parts.append("</svg>")
    return "".join(parts)


def _legend(y: float, color: str, name: str, dashed: bool = False) -> str:
    x = WIDTH - RIGHT + 10
    dash = ' stroke-dasharray="4 2"' if dashed else ""
    short = name if len(name) <= 26 else name[:25] + "…"
    return (
        f'<line x1="{x}" x2="{x + 18}" y1="{y}" y2="{y}" stroke="{color}" stroke-width="2"{dash}/>'
        f'<text x="{x + 24}" y="{y + 4}" font-size="11">{escape(short)}<title>{escape(name)}</title></text>'
    )


def heatmap(title: str, rows: list[tuple[str, list[int]]], chart_id: str) -> str:
    """Expert load per layer: one row per layer, one cell per expert, darker = more tokens
    (each row scaled to its own busiest expert, so every layer's balance shows)."""
    label = escape(title)
    if not rows:
        return (
            f'<svg class="chart" id="{chart_id}" viewBox="0 0 {WIDTH} 40" role="img" aria-label="{label}" '
            f'xmlns="http://www.w3.org/2000/svg"><text x="{WIDTH / 2}" y="24" text-anchor="middle" '
            'class="empty">no expert load recorded</text></svg>'
        )
    experts = max(len(values) for _, values in rows)
    cell = max(4.0, min(24.0, (WIDTH - 90) / max(experts, 1)))
    height = 30 + cell * len(rows)
    width = 90 + cell * experts + 10
    parts = [  # drawn at its own size: a few experts are not blown up to the page's width
        f'<svg class="chart heatmap" id="{chart_id}" width="{width:.0f}" height="{height:.0f}" '
        f'viewBox="0 0 {width:.0f} {height:.0f}" '
        f'role="img" aria-label="{label}" xmlns="http://www.w3.org/2000/svg" font-size="11">'
    ]
    for r, (layer, values) in enumerate(rows):
        top = 20 + r * cell
        parts.append(
            f'<text x="84" y="{top + cell * 0.7:.1f}" text-anchor="end">layer {escape(layer)}</text>'
        )
        busiest = max(values) or 1
        for e, value in enumerate(values):
            shade = value / busiest
            parts.append(
                f'<rect x="{90 + e * cell:.1f}" y="{top:.1f}" width="{cell - 1:.1f}" height="{cell - 1:.1f}" '
                f'fill="rgb({int(240 - 200 * shade)},{int(244 - 160 * shade)},{int(250 - 80 * shade)})" '
                f'data-layer="{escape(layer)}" data-expert="{e}" data-value="{value}">'
                f"<title>layer {escape(layer)}, expert {e}: {value} tokens</title></rect>"
            )
    parts.append(f'<text x="90" y="12">expert 0 … {experts - 1}</text></svg>')
    return "".join(parts)
