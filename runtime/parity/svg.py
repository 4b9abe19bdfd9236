"""Small inline SVG charts for the HTML report: no plotting library, no server, any browser renders them."""

from __future__ import annotations

import math
from html import escape

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")
W, H, PAD_L, PAD_B, PAD_T, PAD_R = 780, 300, 72, 100, 20, 20


def _frame(title: str, y_label: str, body: list[str], legend: list[tuple[str, str]]) -> str:
    items = "".join(f'<tspan fill="{c}" dx="12">■ {escape(n)}</tspan>' for n, c in legend)
    return (f'<figure><figcaption>{escape(title)}</figcaption><svg xmlns="http://www.w3.org/2000/svg" '
            f'width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="11">'
            f'<text x="14" y="{PAD_T + (H - PAD_T - PAD_B) / 2}" transform="rotate(-90 12 '
            f'{PAD_T + (H - PAD_T - PAD_B) / 2})" text-anchor="middle">{escape(y_label)}</text>'
            f'<line x1="{PAD_L}" y1="{H - PAD_B}" x2="{W - PAD_R}" y2="{H - PAD_B}" stroke="#333"/>'
            f'<line x1="{PAD_L}" y1="{PAD_T}" x2="{PAD_L}" y2="{H - PAD_B}" stroke="#333"/>'
            + "".join(body) + f'<text x="{PAD_L}" y="{H - 6}">{items}</text></svg></figure>')


def _x(i: int, n: int) -> float:
    return PAD_L + (W - PAD_L - PAD_R) * (i + 0.5) / max(n, 1)


def _xlabels(labels: list[str]) -> list[str]:
    step = max(1, math.ceil(len(labels) / 40))
    return [f'<text x="{_x(i, len(labels)):.1f}" y="{H - PAD_B + 8}" transform="rotate(60 {_x(i, len(labels)):.1f} '
            f'{H - PAD_B + 8})" font-size="9">{escape(lb)}</text>' for i, lb in enumerate(labels) if i % step == 0]


def log_lines(title: str, y_label: str, labels: list[str], series: dict[str, list[float | None]],
              marks: dict[str, list[bool]] | None = None) -> str:
    """Lines over categorical x (taps in model order) on a log10 y axis; `marks` rings failing points."""
    vals = [v for s in series.values() for v in s if v is not None and v > 0]
    lo, hi = (math.floor(math.log10(min(vals))), math.ceil(math.log10(max(vals)))) if vals else (-8, 0)
    hi = max(hi, lo + 1)
    y = lambda v: H - PAD_B - (H - PAD_T - PAD_B) * (math.log10(v) - lo) / (hi - lo)  # noqa: E731
    body = [f'<text x="{PAD_L - 4}" y="{y(10.0 ** e) + 3:.1f}" text-anchor="end">1e{e}</text>'
            f'<line x1="{PAD_L}" y1="{y(10.0 ** e):.1f}" x2="{W - PAD_R}" y2="{y(10.0 ** e):.1f}" stroke="#eee"/>'
            for e in range(lo, hi + 1)]
    body += _xlabels(labels)
    legend = []
    for k, (name, s) in enumerate(series.items()):
        c = COLORS[k % len(COLORS)]
        legend.append((name, c))
        pts = [(_x(i, len(labels)), y(v)) for i, v in enumerate(s) if v is not None and v > 0]
        body.append(f'<polyline fill="none" stroke="{c}" stroke-width="1.5" points="'
                    + " ".join(f"{a:.1f},{b:.1f}" for a, b in pts) + '"/>')
        for i, v in enumerate(s):
            if v is not None and v > 0:
                bad = marks and marks.get(name) and marks[name][i]
                body.append(f'<circle cx="{_x(i, len(labels)):.1f}" cy="{y(v):.1f}" r="{4 if bad else 2}" '
                            f'fill="{"none" if bad else c}" stroke="{c}"><title>{escape(labels[i])}: {v:.3g}'
                            f'{" FAIL" if bad else ""}</title></circle>')
    return _frame(title, y_label, body, legend)


def bars(title: str, y_label: str, labels: list[str], series: dict[str, list[float]], y_max: float | None = None) -> str:
    """Grouped bars over categorical x on a linear y axis from 0."""
    top = y_max or max([v for s in series.values() for v in s] + [1e-12])
    y = lambda v: H - PAD_B - (H - PAD_T - PAD_B) * v / top  # noqa: E731
    body = [f'<text x="{PAD_L - 4}" y="{y(top * f) + 3:.1f}" text-anchor="end">{top * f:.3g}</text>'
            f'<line x1="{PAD_L}" y1="{y(top * f):.1f}" x2="{W - PAD_R}" y2="{y(top * f):.1f}" stroke="#eee"/>'
            for f in (0, 0.25, 0.5, 0.75, 1)]
    body += _xlabels(labels)
    n, k = len(labels), max(len(series), 1)
    bw = (W - PAD_L - PAD_R) / max(n, 1) * 0.8 / k
    legend = []
    for j, (name, s) in enumerate(series.items()):
        c = COLORS[j % len(COLORS)]
        legend.append((name, c))
        for i, v in enumerate(s):
            x0 = _x(i, n) - bw * k / 2 + j * bw
            body.append(f'<rect x="{x0:.1f}" y="{y(v):.1f}" width="{bw:.1f}" height="{max(y(0) - y(v), 0):.1f}" '
                        f'fill="{c}"><title>{escape(labels[i])}: {v:.4g}</title></rect>')
    return _frame(title, y_label, body, legend)
