"""A simple chart of a merged result, as plain geometry for an inline SVG (no script, no library).

With a time bucket: one line per series (the other group keys), the first
numeric aggregate over time, at most :data:`MAX_SERIES` series (those with the
most points). Without: one horizontal bar per row of the first numeric
aggregate, the first :data:`MAX_BARS` rows in the result's order.
"""

from __future__ import annotations

import datetime as dt
import math
from typing import Any

WIDTH = 720
PLOT_LEFT = 170
PLOT_RIGHT = 20
BAR_HEIGHT = 18
LINE_HEIGHT = 260
MAX_BARS = 30
MAX_SERIES = 8
COLOURS = ("#2563eb", "#dc2626", "#16a34a", "#d97706", "#7c3aed", "#0891b2", "#db2777", "#4b5563")
NUMERIC = ("int", "float", "bool")


def _finite(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float) and math.isfinite(value):
        return float(value)
    return None


def _label(value: Any) -> str:
    return "—" if value is None else str(value)


def _ticks(low: float, high: float) -> list[float]:
    if high <= low:
        return [low]
    step = 10 ** math.floor(math.log10((high - low) / 4))
    for factor in (1, 2, 5, 10):
        if (high - low) / (step * factor) <= 5:
            step *= factor
            break
    first = math.floor(low / step) * step
    return [first + i * step for i in range(int((high - first) / step) + 2) if first + i * step <= high + step / 2]


def chart_for(merged: dict[str, Any], key_names: list[str], time_key: str | None) -> dict[str, Any] | None:
    """The chart of ``merged`` (a MergedResult as JSON), or None when it has nothing numeric to draw."""
    columns: list[str] = merged.get("columns") or []
    types: list[str] = merged.get("types") or []
    rows: list[list[Any]] = merged.get("rows") or []
    measures = [i for i, (c, t) in enumerate(zip(columns, types, strict=False)) if c not in key_names and t in NUMERIC]
    if not rows or not measures:
        return None
    m = measures[0]
    if time_key is not None and time_key in columns:
        return _lines(columns, rows, m, key_names, columns.index(time_key))
    return _bars(columns, rows, m, key_names)


def _bars(columns: list[str], rows: list[list[Any]], m: int, key_names: list[str]) -> dict[str, Any] | None:
    keys = [columns.index(k) for k in key_names if k in columns]
    shown = [(" · ".join(_label(r[k]) for k in keys) or "all", _finite(r[m])) for r in rows[:MAX_BARS]]
    values = [v for _, v in shown if v is not None]
    if not values:
        return None
    low, high = min(0.0, *values), max(0.0, *values)
    span = (high - low) or 1.0
    plot = WIDTH - PLOT_LEFT - PLOT_RIGHT

    def x(v: float) -> float:
        return PLOT_LEFT + (v - low) / span * plot

    bars = []
    for i, (label, value) in enumerate(shown):
        y = 10 + i * (BAR_HEIGHT + 4)
        if value is None:
            bars.append({"label": label[:28], "y": y, "text_y": y + BAR_HEIGHT - 5, "x": x(0), "width": 0,
                         "value": "—"})
            continue
        start, end = sorted((x(0.0), x(value)))
        bars.append({"label": label[:28], "y": y, "text_y": y + BAR_HEIGHT - 5, "x": round(start, 1),
                     "width": round(max(end - start, 1.0), 1), "value": f"{value:.4g}"})
    height = 20 + len(shown) * (BAR_HEIGHT + 4)
    return {"kind": "bars", "measure": columns[m], "width": WIDTH, "height": height, "bars": bars,
            "zero_x": round(x(0.0), 1), "more": max(0, len(rows) - MAX_BARS)}


def _time(value: Any) -> float | None:
    if not isinstance(value, str):
        return None
    try:
        return dt.datetime.fromisoformat(value).replace(tzinfo=dt.UTC).timestamp()
    except ValueError:
        return None


def _lines(columns: list[str], rows: list[list[Any]], m: int, key_names: list[str], t: int) -> dict[str, Any] | None:
    others = [columns.index(k) for k in key_names if k in columns and columns.index(k) != t]
    series: dict[str, list[tuple[float, float]]] = {}
    for row in rows:
        when, value = _time(row[t]), _finite(row[m])
        if when is None or value is None:
            continue
        name = " · ".join(_label(row[k]) for k in others) or columns[m]
        series.setdefault(name, []).append((when, value))
    if not series:
        return None
    chosen = sorted(series, key=lambda s: (-len(series[s]), s))[:MAX_SERIES]
    points = [p for s in chosen for p in series[s]]
    t0, t1 = min(p[0] for p in points), max(p[0] for p in points)
    v0, v1 = min(p[1] for p in points), max(p[1] for p in points)
    if v0 == v1:
        v0, v1 = v0 - 1, v1 + 1
    plot_w, top, plot_h = WIDTH - 60 - PLOT_RIGHT, 10, LINE_HEIGHT - 40

    def x(when: float) -> float:
        return 60 + ((when - t0) / (t1 - t0) * plot_w if t1 > t0 else plot_w / 2)

    def y(value: float) -> float:
        return top + plot_h - (value - v0) / (v1 - v0) * plot_h

    lines = []
    for i, name in enumerate(chosen):
        pts = sorted(series[name])
        lines.append({"name": name[:40], "colour": COLOURS[i % len(COLOURS)], "legend_y": LINE_HEIGHT + 8 + 18 * i,
                      "points": " ".join(f"{x(a):.1f},{y(b):.1f}" for a, b in pts),
                      "dots": [{"x": round(x(a), 1), "y": round(y(b), 1)} for a, b in pts] if len(pts) <= 60 else []})
    ticks = [{"y": round(y(v), 1), "label": f"{v:.4g}"} for v in _ticks(v0, v1) if v0 <= v <= v1]
    start = dt.datetime.fromtimestamp(t0, dt.UTC).strftime("%Y-%m-%d %H:%M")
    end = dt.datetime.fromtimestamp(t1, dt.UTC).strftime("%Y-%m-%d %H:%M")
    return {"kind": "lines", "measure": columns[m], "width": WIDTH, "height": LINE_HEIGHT + 12 + 18 * len(lines),
            "lines": lines, "ticks": ticks, "plot_left": 60, "plot_right": 60 + plot_w, "plot_bottom": top + plot_h,
            "start": start, "end": end, "more": max(0, len(series) - MAX_SERIES)}
