"""
Draws the panels of a Grafana dashboard (contrib/grafana/pop3d.json) as an
SVG picture, from data a real Prometheus returned for the panels' own
queries.  It is not Grafana and not a screenshot of it: the layout (gridPos),
titles, units and legends are read from the dashboard, each panel's PromQL
is run as written (with the dashboard's variables and ``$__rate_interval``
filled in), and the time series are drawn as lines.  Standard library only.

Two steps, so that a picture can be drawn again without the run:

``fetch``: run every query of the dashboard on Prometheus's HTTP API
(``/api/v1/query_range``) over a time range and write the results as JSON::

    python contrib/grafana/render_dashboard.py fetch \\
        --prometheus http://127.0.0.1:9090 --start 1796000000 --end 1796000180 \\
        --step 5 --rate-interval 30s -o samples.json

``render``: draw the dashboard's panels from such a file::

    python contrib/grafana/render_dashboard.py render samples.json -o dashboard.svg

The picture in the docs (docs/_static/grafana-dashboard.svg, its data beside
it in grafana-dashboard-samples.json) was made so: ``twistd pop3d --workers 2
--metrics tcp:9110:interface=127.0.0.1`` with STLS and an implicit-TLS
port, Prometheus scraping it every 2 seconds, and three minutes of real
POP3 sessions from contrib/grafana/demo_traffic.py.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
import urllib.parse
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

DASHBOARD = Path(__file__).with_name("pop3d.json")

#: Grafana's grid: 24 columns; a row unit is 30 pixels high.
COLUMNS = 24
COLUMN_WIDTH = 50
ROW_HEIGHT = 30
GAP = 6
#: Colours close to Grafana's dark theme and its classic palette.
BACKGROUND = "#111217"
PANEL = "#181b1f"
BORDER = "#2c3235"
TEXT = "#ccccdc"
DIM = "#8e8e9e"
PALETTE = (
    "#73bf69",
    "#f2cc0c",
    "#8ab8ff",
    "#ff780a",
    "#f2495c",
    "#5794f2",
    "#b877d9",
    "#705da0",
    "#37872d",
    "#fade2a",
    "#447ebc",
    "#c15c17",
)
FONT = "font-family='Inter, Helvetica, Arial, sans-serif'"


# -- fetch: the panels' queries on a real Prometheus -----------------------------


def resolve(expr: str, rate_interval: str, variables: dict[str, str]) -> str:
    """A panel's PromQL with Grafana's variables filled in."""
    expr = expr.replace("$__rate_interval", rate_interval)
    for name, value in variables.items():
        expr = expr.replace(f"${name}", value)
    return expr


def legend(template: str, labels: dict[str, str]) -> str:
    """Grafana's legendFormat: ``{{label}}`` replaced by the series' label."""
    if not template:
        return "{" + ", ".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), template)


def query_range(prometheus: str, expr: str, start: float, end: float, step: float) -> Any:
    query = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": step})
    url = f"{prometheus.rstrip('/')}/api/v1/query_range?{query}"
    with urllib.request.urlopen(url, timeout=60) as response:  # noqa: S310 (an admin's URL)
        answer = json.load(response)
    if answer.get("status") != "success":
        raise SystemExit(f"Prometheus refused {expr!r}: {answer}")
    return answer["data"]["result"]


def fetch(
    dashboard: dict[str, Any],
    prometheus: str,
    start: float,
    end: float,
    step: float,
    rate_interval: str,
    variables: dict[str, str],
) -> dict[str, Any]:
    panels = []
    for panel in dashboard["panels"]:
        targets = []
        for target in panel.get("targets", []):
            expr = resolve(target["expr"], rate_interval, variables)
            series = [
                {
                    "legend": legend(target.get("legendFormat", ""), found["metric"]),
                    "values": [[float(t), value] for t, value in found["values"]],
                }
                for found in query_range(prometheus, expr, start, end, step)
            ]
            targets.append({"expr": expr, "series": series})
        panels.append({"id": panel["id"], "title": panel["title"], "targets": targets})
    return {
        "source": f"Prometheus query_range at {prometheus}",
        "start": start,
        "end": end,
        "step": step,
        "rate_interval": rate_interval,
        "panels": panels,
    }


def samples_text(samples: dict[str, Any]) -> str:
    """``samples`` as JSON, each series' values on one line (small; diffs read by series)."""
    values: list[str] = []
    for panel in samples["panels"]:
        for target in panel["targets"]:
            for series in target["series"]:
                values.append(json.dumps(series["values"], separators=(",", ":")))
                series["values"] = f"@values{len(values) - 1}@"
    text = json.dumps(samples, indent=1)
    text = re.sub(r'"@values(\d+)@"', lambda m: values[int(m.group(1))], text)
    return text + "\n"


# -- render: the panels as SVG -----------------------------------------------------


def _number(value: str | float) -> float | None:
    number = float(value)
    return number if math.isfinite(number) else None


def nice_step(value: float) -> float:
    """The smallest 1, 2, 2.5 or 5 times a power of ten at least ``value``."""
    if value <= 0:
        return 1.0
    power = 10 ** math.floor(math.log10(value))
    for factor in (1, 2, 2.5, 5, 10):
        if value <= factor * power * 1.0000001:
            return factor * power
    return 10 * power


def y_ticks(maximum: float) -> list[float]:
    """Grid lines from 0 to at least ``maximum``: four or five, at round values."""
    step = nice_step(maximum / 4)
    count = max(1, math.ceil(maximum / step - 1e-9))
    return [step * i for i in range(count + 1)]


def format_value(value: float, unit: str) -> str:
    """A tick label in the panel's Grafana unit (s, ops, Bps, short)."""
    if unit == "s":
        if value == 0:
            return "0 s"
        if value < 0.001:
            return f"{value * 1e6:.3g} µs"
        if value < 1:
            return f"{value * 1e3:.3g} ms"
        return f"{value:.3g} s"
    scaled, prefix = value, ""
    for step_prefix in ("k", "M", "G"):
        if abs(scaled) < 1000:
            break
        scaled, prefix = scaled / 1000, step_prefix
    text = f"{scaled:.3g}"
    if unit == "ops":
        return f"{text}{prefix} ops/s"
    if unit == "Bps":
        return f"{text} {prefix}B/s"
    return f"{text}{prefix}"


def _clock(seconds: float) -> str:
    return time.strftime("%H:%M:%S", time.gmtime(seconds))


def render_panel(
    panel: dict[str, Any], found: dict[str, Any] | None, start: float, end: float
) -> list[str]:
    grid = panel["gridPos"]
    x = grid["x"] * COLUMN_WIDTH + GAP / 2
    y = grid["y"] * ROW_HEIGHT + GAP / 2
    width = grid["w"] * COLUMN_WIDTH - GAP
    height = grid["h"] * ROW_HEIGHT - GAP
    unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "short")
    out = [
        f"<g class='panel' id='panel-{panel['id']}'>",
        f"<rect x='{x}' y='{y}' width='{width}' height='{height}' rx='3' "
        f"fill='{PANEL}' stroke='{BORDER}'/>",
        f"<text x='{x + 10}' y='{y + 18}' fill='{TEXT}' font-size='13' font-weight='500' "
        f"{FONT}>{escape(panel['title'])}</text>",
    ]
    series = []
    for target in found["targets"] if found else []:
        for one in target["series"]:
            points = [(float(t), _number(v)) for t, v in one["values"]]
            series.append((one["legend"], points))
    # Legend: as many lines as the names need, under the plot.
    items = [(name, PALETTE[i % len(PALETTE)]) for i, (name, _) in enumerate(series)]
    legend_lines: list[list[tuple[str, str, float]]] = [[]]
    used = 0.0
    for name, colour in items:
        item_width = 32 + 7.0 * len(name)
        if used + item_width > width - 20 and legend_lines[-1]:
            legend_lines.append([])
            used = 0.0
        legend_lines[-1].append((name, colour, used))
        used += item_width
    legend_height = 15 * len(legend_lines) if items else 0
    left, right = x + 62, x + width - 12
    top, bottom = y + 30, y + height - 22 - legend_height
    values = [v for _, points in series for _, v in points if v is not None]
    if not values:
        out.append(
            f"<text x='{x + width / 2}' y='{y + height / 2}' fill='{DIM}' font-size='14' "
            f"text-anchor='middle' {FONT}>No data</text>"
        )
        out.append("</g>")
        return out
    ticks = y_ticks(max(values))
    top_value = ticks[-1]

    def px(t: float) -> float:
        return left + (t - start) / (end - start) * (right - left)

    def py(v: float) -> float:
        return bottom - v / top_value * (bottom - top)

    for value in ticks:
        gy = py(value)
        out.append(
            f"<line x1='{left}' y1='{gy:.1f}' x2='{right}' y2='{gy:.1f}' stroke='{BORDER}'/>"
        )
        out.append(
            f"<text x='{left - 6}' y='{gy + 4:.1f}' fill='{DIM}' font-size='10' "
            f"text-anchor='end' {FONT}>{escape(format_value(value, unit))}</text>"
        )
    for i in range(5):
        t = start + (end - start) * i / 4
        anchor = "start" if i == 0 else "end" if i == 4 else "middle"
        out.append(
            f"<text x='{px(t):.1f}' y='{bottom + 14:.1f}' fill='{DIM}' font-size='10' "
            f"text-anchor='{anchor}' {FONT}>{_clock(t)}</text>"
        )
    for (name, points), (_, colour) in zip(series, items, strict=True):
        runs: list[list[str]] = [[]]
        for t, v in points:
            if v is None:
                if runs[-1]:
                    runs.append([])
                continue
            runs[-1].append(f"{px(t):.1f},{py(v):.1f}")
        for run in runs:
            if len(run) > 1:
                out.append(
                    f"<polyline points='{' '.join(run)}' fill='none' stroke='{colour}' "
                    f"stroke-width='1.5'><title>{escape(name)}</title></polyline>"
                )
            elif run:
                cx, cy = run[0].split(",")
                out.append(f"<circle cx='{cx}' cy='{cy}' r='1.5' fill='{colour}'/>")
    for line_number, line in enumerate(legend_lines):
        ly = bottom + 30 + 15 * line_number
        for name, colour, offset in line:
            lx = x + 12 + offset
            out.append(
                f"<rect x='{lx:.1f}' y='{ly - 4:.1f}' width='14' height='3' fill='{colour}'/>"
            )
            out.append(
                f"<text x='{lx + 18:.1f}' y='{ly:.1f}' fill='{TEXT}' font-size='11' "
                f"{FONT}>{escape(name)}</text>"
            )
    out.append("</g>")
    return out


def render(dashboard: dict[str, Any], samples: dict[str, Any]) -> str:
    """The SVG text of every panel of ``dashboard``, drawn from ``samples`` (`fetch`)."""
    start, end = float(samples["start"]), float(samples["end"])
    found = {panel["id"]: panel for panel in samples["panels"]}
    panels = dashboard["panels"]
    width = COLUMNS * COLUMN_WIDTH
    grid_bottom = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels) * ROW_HEIGHT
    height = grid_bottom + 52
    captions = (
        "The panels of contrib/grafana/pop3d.json, drawn by contrib/grafana/render_dashboard.py"
        " from Prometheus's answers to their queries during a real pop3d run",
        f"({_clock(start)} to {_clock(end)} UTC, $__rate_interval={samples['rate_interval']}):"
        " not a Grafana screenshot.",
    )
    out = [
        "<svg xmlns='http://www.w3.org/2000/svg' "
        f"width='{width}' height='{height}' viewBox='0 0 {width} {height}'>",
        f"<title>{escape(dashboard['title'])} dashboard</title>",
        f"<rect width='{width}' height='{height}' fill='{BACKGROUND}'/>",
    ]
    for panel in panels:
        out.extend(render_panel(panel, found.get(panel["id"]), start, end))
    for number, caption in enumerate(captions):
        out.append(
            f"<text x='8' y='{grid_bottom + 22 + 17 * number}' fill='{DIM}' font-size='12' "
            f"{FONT}>{escape(caption)}</text>"
        )
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dashboard", type=Path, default=DASHBOARD)
    commands = parser.add_subparsers(dest="command", required=True)
    fetching = commands.add_parser("fetch", help="run the panels' queries on Prometheus")
    fetching.add_argument("--prometheus", required=True, help="e.g. http://127.0.0.1:9090")
    fetching.add_argument("--start", type=float, required=True, help="Unix time")
    fetching.add_argument("--end", type=float, required=True, help="Unix time")
    fetching.add_argument("--step", type=float, default=5.0, help="seconds")
    fetching.add_argument("--rate-interval", default="1m", help="for $__rate_interval")
    fetching.add_argument(
        "--var", action="append", default=[], help="NAME=VALUE (default job=.*, instance=.*)"
    )
    fetching.add_argument("-o", "--output", type=Path, required=True)
    rendering = commands.add_parser("render", help="draw the panels from fetched samples")
    rendering.add_argument("samples", type=Path)
    rendering.add_argument("-o", "--output", type=Path, required=True)
    args = parser.parse_args(argv)
    dashboard = json.loads(args.dashboard.read_text())
    if args.command == "fetch":
        variables = {"job": ".*", "instance": ".*"}
        variables.update(item.split("=", 1) for item in args.var)
        samples = fetch(
            dashboard,
            args.prometheus,
            args.start,
            args.end,
            args.step,
            args.rate_interval,
            variables,
        )
        args.output.write_text(samples_text(samples))
    else:
        samples = json.loads(args.samples.read_text())
        args.output.write_text(render(dashboard, samples))


if __name__ == "__main__":
    main()
