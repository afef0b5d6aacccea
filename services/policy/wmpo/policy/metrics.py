"""Imitation metrics: the masked cross-entropy on action tokens (the BC loss `train.py` minimises) and its
mean over held-out samples (the validation loss)."""

from __future__ import annotations

import numpy as np
import torch

from wmpo.data.dataset import PolicySamples
from wmpo.policy.checkpoint import PolicyBundle, PolicyInputs


def sample_batch(
    bundle: PolicyBundle, samples: PolicySamples, rows: list[int]
) -> tuple[PolicyInputs, torch.Tensor, torch.Tensor]:
    """Model inputs, target action tokens [B, T, A] and step mask [B, T] of dataset samples."""
    items = [samples[i] for i in rows]
    inputs = bundle.prepare(
        [{bundle.camera_names[0]: it["image"]} for it in items],
        [it["proprio"] for it in items],
        [it["instruction"] for it in items],
    )
    tokens = torch.from_numpy(np.stack([bundle.codec.to_tokens(it["actions"]) for it in items])).to(bundle.device)
    mask = torch.from_numpy(np.stack([it["mask"] for it in items])).to(bundle.device)
    return inputs, tokens, mask


def bc_loss(bundle: PolicyBundle, inputs: PolicyInputs, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the action tokens of real (unpadded) steps."""
    logits = bundle.logits(inputs)  # [B, T, A, bins]
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 2), tokens.flatten(), reduction="none")
    weights = mask[:, :, None].expand_as(tokens).flatten().float()
    return (ce * weights).sum() / weights.sum().clamp_min(1.0)


@torch.no_grad()
def validation_loss(bundle: PolicyBundle, samples: PolicySamples, rows: list[int], batch_size: int) -> float | None:
    """`bc_loss` averaged over batches of the given samples (eval mode); None without samples."""
    if not rows:
        return None
    bundle.model.eval()
    losses = []
    for i in range(0, len(rows), batch_size):
        inputs, tokens, mask = sample_batch(bundle, samples, [int(r) for r in rows[i : i + batch_size]])
        losses.append(float(bc_loss(bundle, inputs, tokens, mask)))
    return float(np.mean(losses))
