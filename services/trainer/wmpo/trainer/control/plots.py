"""Self-contained SVG line plots (no JavaScript, no CDN) for the control-plane dashboard and the demo report."""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence

COLORS = ("#0969da", "#cf222e", "#1a7f37", "#8250df", "#bc4c00")


def svg_lines(
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    title: str,
    *,
    width: int = 340,
    height: int = 170,
    x_label: str = "",
) -> str:
    """Several named (xs, ys) lines on one set of axes, with a legend when there is more than one."""
    left, right, top, bottom = 48, 10, 22, 22
    inner_w, inner_h = width - left - right, height - top - bottom
    head = f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img">'
    label = html.escape(title)
    points_all = [(x, y) for xs, ys in series.values() for x, y in zip(xs, ys, strict=True)]
    if not points_all:
        return f'<figure>{head}<text x="{left}" y="14" font-size="12">{label}: no data</text></svg></figure>'
    x0, x1 = min(p[0] for p in points_all), max(p[0] for p in points_all)
    y0, y1 = min(p[1] for p in points_all), max(p[1] for p in points_all)
    if x1 == x0:
        x0, x1 = x0 - 0.5, x1 + 0.5
    if y1 == y0:
        pad = abs(y0) * 0.1 or 0.5
        y0, y1 = y0 - pad, y1 + pad

    def px(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * inner_w

    def py(y: float) -> float:
        return top + (1 - (y - y0) / (y1 - y0)) * inner_h

    single = len(series) == 1
    last = next(iter(series.values()))[1][-1] if single and next(iter(series.values()))[1] else None
    heading = f"{label} (last {last:.4g})" if last is not None else label
    parts = [
        head,
        f'<text x="{left}" y="14" font-size="12" font-weight="bold">{heading}</text>',
        f'<rect x="{left}" y="{top}" width="{inner_w}" height="{inner_h}" fill="none" stroke="#d0d7de"/>',
        f'<text x="{left - 4}" y="{top + 9}" font-size="10" text-anchor="end">{y1:.3g}</text>',
        f'<text x="{left - 4}" y="{top + inner_h}" font-size="10" text-anchor="end">{y0:.3g}</text>',
        f'<text x="{left}" y="{height - 6}" font-size="10">{x0:.4g}</text>',
        f'<text x="{left + inner_w}" y="{height - 6}" font-size="10" text-anchor="end">{x1:.4g}</text>',
    ]
    if x_label:
        parts.append(
            f'<text x="{left + inner_w / 2}" y="{height - 6}" font-size="10" text-anchor="middle">'
            f"{html.escape(x_label)}</text>"
        )
    for i, (name, (xs, ys)) in enumerate(series.items()):
        color = COLORS[i % len(COLORS)]
        coords = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in zip(xs, ys, strict=True))
        parts.append(f'<polyline points="{coords}" fill="none" stroke="{color}" stroke-width="1.5"/>')
        if len(xs) <= 60:
            dots = "".join(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="2"/>' for x, y in zip(xs, ys, strict=True))
            parts.append(f'<g fill="{color}">{dots}</g>')
        if not single:
            ly = top + 12 + 12 * i
            parts.append(
                f'<text x="{left + inner_w - 4}" y="{ly}" font-size="10" text-anchor="end" fill="{color}">'
                f"{html.escape(name)}</text>"
            )
    parts.append("</svg>")
    return f"<figure>{''.join(parts)}</figure>"


def svg_plot(xs: Sequence[float], ys: Sequence[float], title: str, width: int = 340, height: int = 170) -> str:
    """A small self-contained SVG line plot of ys against xs, with its y range, x range and last value."""
    return svg_lines({title: (xs, ys)}, title, width=width, height=height)
