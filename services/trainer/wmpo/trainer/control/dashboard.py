"""The control plane's HTML dashboard: a script-free page of runs and versions (``/``) and one page per run
(``/runs/{id}/view``) with an SVG plot per numeric metric and its newest imagined-rollout GIFs. A run with
an imagination audit (``audit_*`` metrics, `wmpo.trainer.audit`) gets its own section of plots, several lines
each: imagined-vs-real success agreement, hallucinated successes, the reward model on the policy's own
rollouts, and world-model PSNR against the real frames next to copy-last-frame at each horizon.

Pages refresh themselves every 10 s while a run shown is active.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from typing import Any

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

from wmpo.common.registry import Registry
from wmpo.trainer.control.deps import Control
from wmpo.trainer.control.plots import svg_lines, svg_plot
from wmpo.trainer.control.runs import ACTIVE, RunRecord

PREFERRED_PLOTS = (
    "imagined_success_rate", "real_success_rate", "loss", "approx_kl", "entropy", "clip_fraction", "kept_groups",
)  # fmt: skip
"""Metrics plotted first on a run's page; every other numeric metric follows, up to `MAX_PLOTS`."""
MAX_PLOTS = 16
MAX_VIDEOS = 24
NOT_PLOTTED = frozenset({"iteration", "time", "timestamp", "wall_time", "policy_version", "new_policy_version"})
AUDIT_PREFIX = "audit_"
AUDIT_PLOTS = (
    ("imagined vs real success", {"accuracy": "audit_agreement", "precision": "audit_precision",
                                  "recall": "audit_recall"}),
    ("hallucinated successes", {"hallucinated rate": "audit_hallucinated_success_rate",
                                "imagined success": "audit_imagined_success_rate",
                                "real success": "audit_real_success_rate"}),
    ("reward model on the policy's rollouts", {"precision": "audit_reward_precision",
                                               "recall": "audit_reward_recall", "AUROC": "audit_reward_auroc"}),
)  # fmt: skip
"""The audit section's plots: title -> {line label: metric}; then one PSNR plot per horizon (world model vs
copy-last-frame)."""

router = APIRouter(tags=["dashboard"])


@router.get("/", response_class=HTMLResponse, summary="Dashboard: runs and versions")
def dashboard(control: Control) -> HTMLResponse:
    return HTMLResponse(render_index(control.store.list(), control.registries()))


@router.get("/runs/{run_id}/view", response_class=HTMLResponse, summary="Dashboard: one run")
def run_view(control: Control, run_id: str) -> HTMLResponse:
    record = control.store.get(run_id)
    return HTMLResponse(render_run(record, control.store.metrics(run_id), control.store.videos(run_id)))


_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5rem;color:#1f2328;background:#fff}
h1{font-size:1.4rem}h2{font-size:1.1rem;margin-top:1.6rem}
table{border-collapse:collapse;font-size:.9rem}
td,th{padding:.3rem .6rem;border-bottom:1px solid #d0d7de;text-align:left}
.s{padding:.1rem .45rem;border-radius:.6rem;font-size:.8rem;color:#fff;background:#6e7781}
.running,.stopping{background:#0969da}
.finished{background:#1a7f37}.failed{background:#cf222e}.pending{background:#9a6700}
.plots,.videos{display:flex;flex-wrap:wrap;gap:1rem}figure{margin:0;font-size:.8rem}
.err{color:#cf222e}a{color:#0969da}code{background:#f6f8fa;padding:.1rem .3rem}
"""


def _page(title: str, body: str, refresh: bool) -> str:
    meta = '<meta http-equiv="refresh" content="10">' if refresh else ""
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8">{meta}<title>{html.escape(title)}</title>'
        f"<style>{_STYLE}</style></head><body>{body}"
        '<p><a href="/">runs</a> · <a href="/docs">API docs</a> · <a href="/metrics">metrics</a></p></body></html>'
    )


def _status(status: str) -> str:
    return f'<span class="s {html.escape(status)}">{html.escape(status)}</span>'


def _progress(record: RunRecord) -> str:
    """Iterations done, out of those planned when known: ``3/10``."""
    return f"{record.iteration}/{record.iterations}" if record.iterations is not None else str(record.iteration)


def render_index(records: Sequence[RunRecord], registries: Sequence[Registry]) -> str:
    """The dashboard's front page: a runs table and each registry's aliases."""
    rows = []
    for r in records:
        rid = html.escape(r.run_id)
        error = f'<span class="err">{html.escape(r.error)}</span>' if r.error else ""
        rows.append(
            f'<tr><td><a href="/runs/{rid}/view">{rid}</a></td><td>{_status(r.status)}</td><td>{_progress(r)}</td>'
            f"<td>{'' if r.policy_version is None else r.policy_version}</td><td>{html.escape(r.created_at)}</td>"
            f"<td>{html.escape(r.updated_at)}</td><td>{error}</td></tr>"
        )
    table = (
        "<table><tr><th>run</th><th>status</th><th>iteration</th><th>policy version</th><th>created</th>"
        f"<th>updated</th><th>error</th></tr>{''.join(rows)}</table>"
        if rows
        else "<p>No runs yet: <code>POST /runs</code> with a run config.</p>"
    )
    versions = []
    for reg in registries:
        aliases = ", ".join(f"{html.escape(a)} → {v}" for a, v in sorted(reg.aliases().items())) or "none"
        versions.append(f"<tr><td>{reg.kind}</td><td>{len(reg.list())}</td><td>{aliases}</td></tr>")
    body = (
        "<h1>WMPO training runs</h1>"
        + table
        + "<h2>Versions</h2><table><tr><th>kind</th><th>versions</th><th>aliases</th></tr>"
        + "".join(versions)
        + "</table>"
    )
    return _page("WMPO runs", body, refresh=any(r.status in ACTIVE for r in records))


def render_run(record: RunRecord, history: Sequence[dict[str, Any]], videos: Sequence[str]) -> str:
    """One run's page: its status, an SVG plot per numeric metric, and its newest GIFs."""
    rid = html.escape(record.run_id)
    series = numeric_series(history)
    audit = {n: xy for n, xy in series.items() if n.startswith(AUDIT_PREFIX)}
    series = {n: xy for n, xy in series.items() if not n.startswith(AUDIT_PREFIX)}
    names = [n for n in PREFERRED_PLOTS if n in series] + sorted(n for n in series if n not in PREFERRED_PLOTS)
    plots = "".join(svg_plot(*series[name], title=name) for name in names[:MAX_PLOTS])
    audit_plots = audit_section(audit)
    shown = sorted(videos, reverse=True)[:MAX_VIDEOS]
    gifs = "".join(
        f'<figure><img src="/runs/{rid}/videos/{html.escape(v)}" alt="{html.escape(v)}" loading="lazy" width="192">'
        f"<figcaption>{html.escape(v)}</figcaption></figure>"
        for v in shown
    )
    version = "-" if record.policy_version is None else str(record.policy_version)
    error = f'<p class="err">{html.escape(record.error)}</p>' if record.error else ""
    body = (
        f"<h1>Run {rid} {_status(record.status)}</h1>{error}"
        f"<p>iteration {_progress(record)} · policy version {version}"
        f" · created {html.escape(record.created_at)} · updated {html.escape(record.updated_at)}</p>"
        f'<p><a href="/runs/{rid}">status (JSON)</a> · <a href="/runs/{rid}/metrics">metrics (JSON)</a>'
        f' · <a href="/runs/{rid}/log">train.log</a></p>'
        f"<h2>Metrics</h2><div class=plots>{plots or '<p>No metrics yet.</p>'}</div>"
        + (f"<h2>Imagination audit</h2><div class=plots>{audit_plots}</div>" if audit_plots else "")
        + f"<h2>Imagined rollouts ({len(videos)} GIFs, newest {len(shown)} shown)</h2>"
        f"<div class=videos>{gifs or '<p>No videos yet.</p>'}</div>"
    )
    return _page(f"WMPO run {record.run_id}", body, refresh=record.status in ACTIVE)


def audit_section(series: dict[str, tuple[list[float], list[float]]]) -> str:
    """The audit's plots from its ``audit_*`` series ('' when the run has none)."""
    plots = []
    for title, lines in AUDIT_PLOTS:
        shown = {label: series[name] for label, name in lines.items() if name in series}
        if shown:
            plots.append(svg_lines(shown, title, x_label="iteration"))
    horizons = sorted(int(n.rsplit("_h", 1)[1]) for n in series if n.startswith("audit_psnr_h"))
    for h in horizons:
        shown = {label: series[name] for label, name in (("world model", f"audit_psnr_h{h}"),
                 ("copy last frame", f"audit_copy_psnr_h{h}")) if name in series}  # fmt: skip
        plots.append(svg_lines(shown, f"PSNR (dB) {h} steps ahead", x_label="iteration"))
    return "".join(plots)


def numeric_series(history: Sequence[dict[str, Any]]) -> dict[str, tuple[list[float], list[float]]]:
    """Metric name (nested keys joined with ``.``) -> (x, y), x being each record's ``iteration`` or its index."""
    series: dict[str, tuple[list[float], list[float]]] = {}
    for index, record in enumerate(history):
        x = record.get("iteration", index)
        if not isinstance(x, int | float) or isinstance(x, bool):
            x = index
        for name, value in _flatten(record):
            if name in NOT_PLOTTED or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            if math.isfinite(value):
                xs, ys = series.setdefault(name, ([], []))
                xs.append(float(x))
                ys.append(float(value))
    return series


def _flatten(record: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    items: list[tuple[str, Any]] = []
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            items.extend(_flatten(value, f"{name}."))
        else:
            items.append((name, value))
    return items
