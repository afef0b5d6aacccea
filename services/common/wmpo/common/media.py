"""Writing frames people can look at (animated GIFs; Pillow only)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from wmpo.common.tensors import Array


def write_gif(frames: Array, path: Path, *, fps: int = 15, scale: int = 4) -> None:
    """Write uint8 [T, H, W, C] frames as an animated GIF, upscaled `scale` times (nearest neighbour)."""
    from PIL import Image

    big = np.repeat(np.repeat(frames, scale, axis=1), scale, axis=2)
    images = [Image.fromarray(f[:, :, 0] if f.shape[-1] == 1 else f) for f in big]
    images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
