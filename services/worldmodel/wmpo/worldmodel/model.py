"""The world model: an action-conditioned pixel-space video diffusion model built from `diffusers` parts.

Input: K context frames and F actions (one per future frame); output: the F future frames. Frames are
stacked on channels around a `UNet2DModel` (3·(K+F) channels in: the noisy future frames and the context;
3·F out). The F actions, in order, and the context-noise level go through an MLP whose output is added to
the diffusion timestep embedding (`class_embed_type="identity"`), which the UNet's ResNet blocks apply as
scale-and-shift (`resnet_time_scale_shift="scale_shift"`). A learned null-action embedding replaces the
actions for classifier-free guidance.

The diffusion runs on the *change* from the last context frame (future − last context frame), so an
untrained model starts at the copy-last-frame baseline and learning only has to add motion.

Training is EDM (Karras et al. 2022) with `EDMEulerScheduler`'s preconditioning; sampling is its
deterministic Euler sampler with a few steps (3 by default, as DIAMOND showed enough at 64×64). Context
frames are noised during training (a random level the model is told about), against drift over long
imagined horizons.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import EDMEulerScheduler, UNet2DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

PRESETS: dict[str, dict[str, Any]] = {
    # ~1.2M parameters: ~0.75 s per batch-16 training step on 2 CPU cores at 64x64 (DESIGN.md §7).
    "tiny": {"block_out_channels": (32, 64, 64), "layers_per_block": 1},
    # ~20M parameters: sized for one GPU.
    "base": {"block_out_channels": (64, 128, 256, 256), "layers_per_block": 2},
}


class WorldModel(ModelMixin, ConfigMixin):
    """Denoiser D(noisy future, context, actions, sigma) with EDM preconditioning."""

    config_name = "config.json"
    config: Any  # diffusers' FrozenDict, read by attribute

    @register_to_config  # type: ignore[untyped-decorator]
    def __init__(
        self,
        image_size: int = 64,
        channels: int = 3,
        context_frames: int = 4,
        future_frames: int = 8,
        action_dim: int = 4,
        block_out_channels: tuple[int, ...] = (32, 64, 64),
        layers_per_block: int = 1,
        sigma_min: float = 0.002,
        sigma_max: float = 5.0,
        sigma_data: float = 0.1,
        train_p_mean: float = -2.0,
        train_p_std: float = 1.2,
        max_context_noise: float = 0.1,
        cfg_dropout: float = 0.1,
        preset: str = "custom",
    ) -> None:
        super().__init__()
        blocks = len(block_out_channels)
        time_dim = block_out_channels[0] * 4
        self.unet = UNet2DModel(
            sample_size=image_size,
            in_channels=channels * (context_frames + future_frames),
            out_channels=channels * future_frames,
            block_out_channels=tuple(block_out_channels),
            layers_per_block=layers_per_block,
            down_block_types=("DownBlock2D",) * blocks,
            up_block_types=("UpBlock2D",) * blocks,
            class_embed_type="identity",
            resnet_time_scale_shift="scale_shift",
            norm_num_groups=min(8, block_out_channels[0]),
            add_attention=False,
        )
        self.action_encoder = nn.Sequential(
            nn.Linear(future_frames * action_dim + 1, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim)
        )
        self.null_action = nn.Parameter(torch.zeros(future_frames * action_dim))

    # -- scheduling ------------------------------------------------------------------------------------
    def scheduler(self) -> EDMEulerScheduler:
        cfg = self.config
        return EDMEulerScheduler(sigma_min=cfg.sigma_min, sigma_max=cfg.sigma_max, sigma_data=cfg.sigma_data)

    # -- the network -----------------------------------------------------------------------------------
    def _conditioning(self, actions: torch.Tensor | None, context_noise: torch.Tensor, batch: int) -> torch.Tensor:
        flat = self.null_action.expand(batch, -1) if actions is None else actions.flatten(1).to(self.dtype)
        level = (context_noise.to(self.dtype) / max(self.config.max_context_noise, 1e-6))[:, None]
        out: torch.Tensor = self.action_encoder(torch.cat([flat, level], dim=1))
        return out

    def denoise(
        self,
        noisy: torch.Tensor,  # [B, F*C, H, W], the noisy future frames
        sigma: torch.Tensor,  # [B]
        context: torch.Tensor,  # [B, K*C, H, W] in [-1, 1]
        actions: torch.Tensor | None,  # [B, F, A] or None (null action)
        context_noise: torch.Tensor,  # [B]
        scheduler: EDMEulerScheduler,
    ) -> torch.Tensor:
        """The EDM denoised estimate of the future frames."""
        view = sigma.view(-1, 1, 1, 1).to(noisy.dtype)
        scaled = scheduler.precondition_inputs(noisy, view)
        c_noise = scheduler.precondition_noise(sigma).to(noisy.dtype) * 250.0
        emb = self._conditioning(actions, context_noise, noisy.shape[0])
        out = self.unet(torch.cat([scaled, context], dim=1), c_noise, class_labels=emb).sample
        denoised: torch.Tensor = scheduler.precondition_outputs(noisy, out, view)
        return denoised

    def training_loss(
        self,
        context: torch.Tensor,
        actions: torch.Tensor,
        future: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """EDM loss for a batch: context [B,K,C,H,W], actions [B,F,A], future [B,F,C,H,W], pixels in [-1, 1]."""
        cfg = self.config
        batch = future.shape[0]
        device = future.device
        scheduler = self.scheduler()
        sigma = torch.exp(cfg.train_p_mean + cfg.train_p_std * torch.randn(batch, device=device, generator=generator))
        target = future.flatten(1, 2) - context[:, -1].repeat(1, cfg.future_frames, 1, 1)
        noisy = target + sigma.view(-1, 1, 1, 1) * torch.randn(target.shape, device=device, generator=generator)
        level = cfg.max_context_noise * torch.rand(batch, device=device, generator=generator)
        level = torch.where(torch.rand(batch, device=device, generator=generator) < 0.3, 0.0, level)  # clean too
        ctx = context.flatten(1, 2)
        ctx = ctx + level.view(-1, 1, 1, 1) * torch.randn(ctx.shape, device=device, generator=generator)
        drop = torch.rand(batch, device=device, generator=generator) < cfg.cfg_dropout
        acts = torch.where(drop.view(-1, 1, 1), self.null_action.view(1, cfg.future_frames, cfg.action_dim), actions)
        denoised = self.denoise(noisy, sigma, ctx, acts, level, scheduler)
        weight = (sigma**2 + cfg.sigma_data**2) / (sigma * cfg.sigma_data) ** 2
        loss: torch.Tensor = (weight.view(-1, 1, 1, 1) * (denoised - target) ** 2).mean()
        return loss

    @torch.no_grad()
    def sample(
        self,
        context: torch.Tensor,  # [B, K, C, H, W] in [-1, 1]
        actions: torch.Tensor,  # [B, F, A]
        *,
        steps: int = 3,
        generator: torch.Generator | list[torch.Generator] | None = None,
        guidance: float = 1.0,
        context_noise: float = 0.0,
    ) -> torch.Tensor:
        """Imagine the F future frames, [B, F, C, H, W] in [-1, 1].

        The Euler sampler is deterministic given the initial noise: a seeded `generator` (or one per row, so a
        row's frames do not depend on the rest of the batch) makes the result reproducible.
        """
        cfg = self.config
        batch, device = context.shape[0], context.device
        scheduler = self.scheduler()
        scheduler.set_timesteps(steps, device=device)
        shape = (batch, cfg.future_frames * cfg.channels, cfg.image_size, cfg.image_size)
        if isinstance(generator, list):
            noise = torch.stack([torch.randn(shape[1:], generator=g) for g in generator])
        else:
            noise = torch.randn(shape, generator=generator)
        sigmas: torch.Tensor = scheduler.sigmas
        x = noise.to(device, self.dtype) * sigmas[0]
        ctx = context.flatten(1, 2).to(self.dtype)
        level = torch.full((batch,), context_noise, device=device)
        acts = actions.to(device, self.dtype)
        for i in range(steps):
            sigma, next_sigma = sigmas[i], sigmas[i + 1]
            sig = sigma.expand(batch).to(device)
            denoised = self.denoise(x, sig, ctx, acts, level, scheduler)
            if guidance != 1.0:
                unconditional = self.denoise(x, sig, ctx, None, level, scheduler)
                denoised = unconditional + guidance * (denoised - unconditional)
            x = x + (x - denoised) / sigma * (next_sigma - sigma)  # Euler step of dx/dsigma = (x - D) / sigma
        frames = x + context[:, -1].to(x.dtype).repeat(1, cfg.future_frames, 1, 1)
        shaped: torch.Tensor = frames.clamp(-1, 1).view(
            batch, cfg.future_frames, cfg.channels, cfg.image_size, cfg.image_size
        )
        return shaped


def make_world_model(preset: str, **overrides: Any) -> WorldModel:
    """A `WorldModel` from a preset (`tiny`, `base`) with any config value overridden."""
    if preset not in PRESETS:
        raise ValueError(f"unknown world-model config {preset!r}; choose one of {', '.join(PRESETS)}")
    model: WorldModel = WorldModel(**(PRESETS[preset] | overrides | {"preset": preset}))
    return model


def to_model_frames(frames: torch.Tensor) -> torch.Tensor:
    """uint8 [..., H, W, C] -> float [..., C, H, W] in [-1, 1]."""
    return frames.movedim(-1, -3).float().div(127.5).sub(1.0)


def to_uint8_frames(frames: torch.Tensor) -> torch.Tensor:
    """float [..., C, H, W] in [-1, 1] -> uint8 [..., H, W, C]."""
    return frames.add(1.0).mul(127.5).round().clamp(0, 255).to(torch.uint8).movedim(-3, -1)
