"""World-model metrics: the one-step error that training reports, and fidelity — open-loop replay of held-out
episodes with their logged actions, scored by PSNR and SSIM at several horizons next to the copy-last-frame
baseline, with side-by-side real|imagined videos."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wmpo.common.media import write_gif
from wmpo.common.tensors import Array
from wmpo.data.dataset import WorldModelWindows
from wmpo.data.episode import Episode
from wmpo.worldmodel.model import WorldModel, to_model_frames, to_uint8_frames

HORIZONS = (1, 8, 16, 32)


def window_batch(windows: WorldModelWindows, rows: list[int], device: str) -> tuple[torch.Tensor, ...]:
    """Model tensors (context, actions, future) of dataset windows."""
    items = [windows[i] for i in rows]
    context = to_model_frames(torch.from_numpy(np.stack([it["context"] for it in items])))
    actions = torch.from_numpy(np.stack([it["actions"] for it in items])).float()
    future = to_model_frames(torch.from_numpy(np.stack([it["future"] for it in items])))
    return context.to(device), actions.to(device), future.to(device)


def one_step_mse(
    model: WorldModel, windows: WorldModelWindows, rows: list[int], steps: int, device: str
) -> dict[str, float]:
    """Mean squared error (pixels in [-1, 1]) of the first imagined frame vs copying the last context frame."""
    model.eval()
    errors, baseline = [], []
    generator = torch.Generator().manual_seed(0)
    for i in range(0, len(rows), 16):
        context, actions, future = window_batch(windows, rows[i : i + 16], device)
        imagined = model.sample(context, actions, steps=steps, generator=generator)
        errors.append(((imagined[:, 0] - future[:, 0]) ** 2).mean(dim=(1, 2, 3)).cpu())
        baseline.append(((context[:, -1] - future[:, 0]) ** 2).mean(dim=(1, 2, 3)).cpu())
    return {"mse_h1": float(torch.cat(errors).mean()), "copy_last_mse_h1": float(torch.cat(baseline).mean())}


def psnr(a: Array, b: Array) -> float:
    """Peak signal-to-noise ratio of two uint8 images, in dB (100 for identical images)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 100.0 if mse == 0 else 10.0 * np.log10(255.0**2 / mse)


def ssim(a: Array, b: Array) -> float:
    """Structural similarity of two uint8 HWC images (Gaussian window 11, σ 1.5, averaged over channels)."""
    x = torch.from_numpy(a.astype(np.float32)).permute(2, 0, 1)[None]
    y = torch.from_numpy(b.astype(np.float32)).permute(2, 0, 1)[None]
    coords = torch.arange(11, dtype=torch.float32) - 5
    g = torch.exp(-(coords**2) / (2 * 1.5**2))
    window = (g[:, None] * g[None, :] / g.sum() ** 2).expand(x.shape[1], 1, 11, 11)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.conv2d(t, window, padding=5, groups=x.shape[1])

    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mu_x, mu_y = blur(x), blur(y)
    var_x, var_y, cov = blur(x * x) - mu_x**2, blur(y * y) - mu_y**2, blur(x * y) - mu_x * mu_y
    value = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return float(value.mean())


@torch.no_grad()
def imagine_open_loop(
    model: WorldModel, episode: Episode, horizon: int, *, start: int = 0, steps: int = 3, seed: int = 0
) -> Array:
    """Imagine `horizon` frames after frame `start` from the logged actions (uint8 [horizon, H, W, C])."""
    cfg = model.config
    device = next(model.parameters()).device
    idx = np.clip(np.arange(start - cfg.context_frames + 1, start + 1), 0, None)
    context = to_model_frames(torch.from_numpy(episode.frames[idx]))[None].to(device)
    generator = torch.Generator().manual_seed(seed)
    out: list[torch.Tensor] = []
    t = start
    while len(out) < horizon and t < episode.length:
        actions = episode.actions[t : t + cfg.future_frames]
        if len(actions) < cfg.future_frames:  # pad the last chunk by repeating the last action
            actions = np.concatenate([actions, np.repeat(actions[-1:], cfg.future_frames - len(actions), 0)])
        frames = model.sample(context, torch.from_numpy(actions)[None].to(device), steps=steps, generator=generator)
        out.extend(frames[0])
        context = torch.cat([context, frames], dim=1)[:, -cfg.context_frames :]
        t += cfg.future_frames
    return to_uint8_frames(torch.stack(out[:horizon])).cpu().numpy()


@dataclass
class FidelityReport:
    """PSNR/SSIM per horizon for the model and for copy-last-frame, averaged over episodes."""

    horizons: list[int]
    psnr: dict[int, float]
    ssim: dict[int, float]
    copy_psnr: dict[int, float]
    copy_ssim: dict[int, float]
    episodes: int
    videos: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "episodes": self.episodes,
            "horizons": self.horizons,
            "model": {str(h): {"psnr": self.psnr[h], "ssim": self.ssim[h]} for h in self.horizons},
            "copy_last_frame": {str(h): {"psnr": self.copy_psnr[h], "ssim": self.copy_ssim[h]} for h in self.horizons},
            "videos": self.videos,
        }


def evaluate_fidelity(
    model: WorldModel,
    episodes: Sequence[Episode],
    *,
    horizons: Sequence[int] = HORIZONS,
    steps: int = 3,
    video_dir: Path | None = None,
    videos: int = 2,
) -> FidelityReport:
    """Replay each episode open loop from its first frame for max(horizons) frames and score each horizon."""
    longest = max(horizons)
    scores: dict[str, dict[int, list[float]]] = {k: {h: [] for h in horizons} for k in ("p", "s", "cp", "cs")}
    paths = []
    for n, episode in enumerate(episodes):
        imagined = imagine_open_loop(model, episode, min(longest, episode.length), steps=steps, seed=n)
        for h in horizons:
            if h > len(imagined):
                continue
            real, fake, last = episode.frames[h], imagined[h - 1], episode.frames[0]
            scores["p"][h].append(psnr(fake, real))
            scores["s"][h].append(ssim(fake, real))
            scores["cp"][h].append(psnr(last, real))
            scores["cs"][h].append(ssim(last, real))
        if video_dir is not None and n < videos:
            video_dir.mkdir(parents=True, exist_ok=True)
            side = np.concatenate([episode.frames[1 : 1 + len(imagined)], imagined], axis=2)
            path = video_dir / f"real-vs-imagined-{episode.episode_id}.gif"
            write_gif(side, path)
            paths.append(str(path))

    def mean(values: dict[int, list[float]]) -> dict[int, float]:
        return {h: float(np.mean(v)) if v else float("nan") for h, v in values.items()}

    return FidelityReport(list(horizons), mean(scores["p"]), mean(scores["s"]), mean(scores["cp"]), mean(scores["cs"]),
                          len(episodes), paths)  # fmt: skip
