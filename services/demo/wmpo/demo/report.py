"""The demo report: `report.json` (the numbers) and `index.html` (one self-contained page: plots as inline
SVG, GIFs embedded as data URIs, no scripts, nothing fetched)."""

from __future__ import annotations

import base64
import html
import json
import shutil
from pathlib import Path
from typing import Any

from wmpo.trainer.control.plots import svg_lines

PLOTTED = (
    ("imagined_success_rate", "imagined success rate"),
    ("kept_group_fraction", "kept-group fraction (dynamic sampling)"),
    ("loss", "clipped surrogate loss"),
    ("approx_kl", "approximate KL"),
    ("clip_fraction", "clip fraction"),
    ("entropy", "token entropy"),
    ("frames_per_s", "imagined frames/s"),
)


def write_report(report: dict[str, Any], out: Path, imagined_videos: Path | None = None) -> Path:
    """Write `out/report.json` and `out/index.html`; imagined-rollout GIFs are copied to `out/videos/imagined`."""
    out.mkdir(parents=True, exist_ok=True)
    if imagined_videos is not None and imagined_videos.is_dir():
        target = out / "videos" / "imagined"
        target.mkdir(parents=True, exist_ok=True)
        for gif in sorted(imagined_videos.glob("*.gif"))[-8:]:
            shutil.copy2(gif, target / gif.name)
    report = _relative_videos(report, out)
    report["videos"] = {
        folder.name: sorted(str(p.relative_to(out)) for p in folder.glob("*.gif"))
        for folder in sorted((out / "videos").glob("*"))
        if folder.is_dir()
    }
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    page = out / "index.html"
    page.write_text(render(report, out))
    return page


def _relative_videos(value: Any, out: Path) -> Any:
    """Absolute GIF paths inside the report -> paths relative to the report folder."""
    if isinstance(value, dict):
        return {k: _relative_videos(v, out) for k, v in value.items()}
    if isinstance(value, list):
        return [_relative_videos(v, out) for v in value]
    if isinstance(value, str) and value.endswith(".gif"):
        path = Path(value)
        if path.is_absolute() or path.exists():
            try:
                return str(path.resolve().relative_to(out.resolve()))
            except ValueError:
                return value
    return value


def _gif(out: Path, rel: str, caption: str) -> str:
    data = base64.b64encode((out / rel).read_bytes()).decode()
    return (
        f'<figure class="video"><img src="data:image/gif;base64,{data}" alt="{html.escape(caption)}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def _rate(e: dict[str, Any]) -> str:
    return (
        f"<b>{e['success_rate']:.0%}</b> <span class=dim>95% CI [{e['ci95_low']:.0%}, {e['ci95_high']:.0%}], "
        f"{e['successes']}/{e['episodes']} episodes</span>"
    )


def _ci_bar(label: str, e: dict[str, Any], color: str) -> str:
    w = 320
    x0, x1, x = (e["ci95_low"] * w, e["ci95_high"] * w, e["success_rate"] * w)
    return (
        f"<div class=bar><span class=lbl>{html.escape(label)}</span>"
        f'<svg width="{w + 10}" height="18"><rect x="0" y="8" width="{w}" height="2" fill="#d0d7de"/>'
        f'<rect x="{x0:.1f}" y="4" width="{max(x1 - x0, 1):.1f}" height="10" fill="{color}" opacity="0.3"/>'
        f'<rect x="{x - 1:.1f}" y="1" width="3" height="16" fill="{color}"/></svg> {_rate(e)}</div>'
    )


def render(report: dict[str, Any], out: Path) -> str:
    """The HTML page for a report (GIF paths relative to `out`)."""
    base, final = report["eval"]["base"], report["eval"]["final"]
    history = report["wmpo"]["iterations"]
    plots = []
    for key, title in PLOTTED:
        points = [(r["iteration"], r[key]) for r in history if isinstance(r.get(key), int | float)]
        plots.append(svg_lines({title: ([p[0] for p in points], [p[1] for p in points])}, title, x_label="iteration"))
    fidelity = []
    for metric in ("psnr", "ssim"):
        series: dict[str, tuple[list[float], list[float]]] = {}
        for which in ("base", "final"):
            fid = report["fidelity"][which]
            hs = [int(h) for h in fid["horizons"] if str(h) in fid["model"]]
            series[f"{which} world model (v{fid['world_model_version']})"] = (
                [float(h) for h in hs], [fid["model"][str(h)][metric] for h in hs])  # fmt: skip
            if which == "base":
                series["copy last frame"] = (
                    [float(h) for h in hs], [fid["copy_last_frame"][str(h)][metric] for h in hs])  # fmt: skip
        fidelity.append(svg_lines(series, f"{metric.upper()} vs horizon (frames)", width=420, height=200))
    videos = report.get("videos", {})
    captions = {
        "fidelity-final": "real rollout of the policy | the aligned world model imagining it (same start and actions)",
        "fidelity-base": "held-out real episode | the base world model imagining it (same start and actions)",
        "imagined": "imagined WMPO rollouts (policy ↔ world model, reward model ends at success)",
        "eval-base": "base policy in the real simulator",
        "eval-final": "final policy in the real simulator",
    }
    video_html = []
    for folder in ("fidelity-final", "fidelity-base", "imagined", "eval-base", "eval-final"):
        gifs = videos.get(folder, [])[:4]
        if gifs:
            figures = "".join(_gif(out, rel, Path(rel).stem) for rel in gifs)
            video_html.append(f"<h3>{html.escape(captions[folder])}</h3><div class=row>{figures}</div>")
    stage_rows = "".join(
        f"<tr><td>{html.escape(k)}</td><td>{v:.0f} s</td></tr>" for k, v in report["stage_seconds"].items()
    )
    iter_rows = "".join(
        "<tr>" + "".join(f"<td>{_cell(r.get(k))}</td>" for k in ITER_COLUMNS) + "</tr>" for r in history
    )
    p = report["profile"]
    delta = final["success_rate"] - base["success_rate"]
    return f"""<!doctype html><html lang=en><head><meta charset=utf-8><title>WMPO demo report</title><style>
body{{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#1f2328;padding:0 1em}}
h1{{margin-bottom:.2em}} .dim{{color:#656d76}} table{{border-collapse:collapse;font-size:13px}}
td,th{{border:1px solid #d0d7de;padding:3px 8px;text-align:right}} th{{background:#f6f8fa}}
.row{{display:flex;flex-wrap:wrap;gap:12px}} figure{{margin:0}} .video img{{image-rendering:pixelated;max-width:260px}}
figcaption{{font-size:11px;color:#656d76}} .bar{{margin:.3em 0}} .lbl{{display:inline-block;width:150px}}
</style></head><body>
<h1>WMPO demo: <code>{html.escape(report["task"])}</code></h1>
<p class=dim>profile {html.escape(p["name"])}, {p["image_size"]}×{p["image_size"]} frames, {p["iterations"]} GRPO
iterations of {p["groups"]} groups × {p["group_size"]} imagined episodes, alignment every {p["align_every"]}
iteration(s) with {p["align_rollouts"]} real rollouts; wall time {report["wall_s"] / 60:.1f} min.</p>
<h2>Real-simulator success (held-out seeds)</h2>
{_ci_bar(f"base policy v{base['version']}", base, "#656d76")}
{_ci_bar(f"final policy v{final['version']}", final, "#0969da")}
<p>Change: <b>{delta:+.0%}</b>. Small evaluation sets have wide intervals: read the change together with them.</p>
<h2>Imagination training, per iteration</h2><div class=row>{"".join(plots)}</div>
<table><tr>{"".join(f"<th>{c}</th>" for c in ITER_COLUMNS)}</tr>{iter_rows}</table>
<h2>World-model fidelity (open loop, logged actions)</h2><div class=row>{"".join(fidelity)}</div>
<h2>Videos</h2>{"".join(video_html) or "<p>no videos</p>"}
<h2>Stages</h2><table><tr><th>stage</th><th>time</th></tr>{stage_rows}</table>
<p class=dim>Numbers: report.json next to this page. Reward model held-out AUROC
{report["reward"]["metrics"].get("auroc", float("nan")):.3f}; real training data
{report["data"]["episodes"]} episodes ({report["data"]["success_rate"]:.0%} successful).</p>
</body></html>
"""


ITER_COLUMNS = (
    "iteration", "policy_version", "imagined_success_rate", "kept_groups", "loss", "approx_kl", "clip_fraction",
    "entropy", "episodes_per_s", "world_model_version", "align_real_success_rate",
)  # fmt: skip


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.3g}"
    return html.escape(str(value))
