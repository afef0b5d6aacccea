"""The VLA network: a SigLIP vision encoder over each camera image, a Llama language model over
[image patches, proprio, instruction, action queries], and a 256-way head per action token.

Decoding is parallel (OFT-style): the T×A action positions are learned query embeddings, so one forward
pass gives independent logits for every action token of the chunk. The chunk's distribution factorises
over tokens, so sampling with a temperature and the exact log-probability of any given tokens come from
the same logits: `sample` and `token_logprobs` agree to floating-point precision.

A row's logits do not depend on its batch: instructions are padded to the batch's longest, padding is never
attended to, and the position ids count only attended tokens (`positions_from_mask`), so the action queries
sit at the positions the row has alone whatever the padding (issue 13).

Configs are `transformers` configs (`VLAConfig` composes a `SiglipVisionConfig` and a `LlamaConfig`), so
`save_pretrained`/`from_pretrained` work on local directories and bigger parts can be configured in.
"""

from __future__ import annotations

from typing import Any

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import (
    LlamaConfig,
    LlamaModel,
    PreTrainedConfig,
    PreTrainedModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)
from transformers.configuration_utils import SubConfigSpec


@strict
class VLAConfig(PreTrainedConfig):
    """The VLA's shape: vision and language sub-configs plus the action/observation contract."""

    model_type = "wmpo_vla"
    sub_configs_defaults = {  # noqa: RUF012
        "vision_config": SubConfigSpec(config_class=SiglipVisionConfig),
        "text_config": SubConfigSpec(config_class=LlamaConfig),
    }

    vision_config: dict | PreTrainedConfig | None = None  # type: ignore[type-arg]
    text_config: dict | PreTrainedConfig | None = None  # type: ignore[type-arg]
    action_dim: int = 4
    chunk_length: int = 8
    num_bins: int = 256
    proprio_dim: int = 4
    max_instruction_tokens: int = 48
    camera_names: list[str] | None = None
    preset: str = "custom"


PRESETS: dict[str, dict[str, Any]] = {
    # ~0.9M parameters: trains on 2 CPU cores (DESIGN.md §7).
    "tiny": {
        "vision": {"image_size": 64, "patch_size": 8, "hidden_size": 128, "num_hidden_layers": 2,
                   "num_attention_heads": 4, "intermediate_size": 256},
        "text": {"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
                 "intermediate_size": 256},
    },
    # ~60M parameters: sized for one GPU.
    "base": {
        "vision": {"image_size": 128, "patch_size": 16, "hidden_size": 384, "num_hidden_layers": 6,
                   "num_attention_heads": 6, "intermediate_size": 1536},
        "text": {"hidden_size": 512, "num_hidden_layers": 8, "num_attention_heads": 8, "num_key_value_heads": 8,
                 "intermediate_size": 2048},
    },
}  # fmt: skip


def make_config(
    preset: str,
    *,
    vocab_size: int,
    action_dim: int = 4,
    proprio_dim: int = 4,
    chunk_length: int = 8,
    image_size: int | None = None,
    camera_names: list[str] | None = None,
) -> VLAConfig:
    """A `VLAConfig` from a preset (`tiny`, `base`) and the task's dimensions."""
    if preset not in PRESETS:
        raise ValueError(f"unknown policy config {preset!r}; choose one of {', '.join(PRESETS)}")
    vision = dict(PRESETS[preset]["vision"], num_channels=3)
    if image_size is not None:
        vision["image_size"] = image_size
    patches = (vision["image_size"] // vision["patch_size"]) ** 2 * len(camera_names or ["main"])
    text = dict(
        PRESETS[preset]["text"], vocab_size=vocab_size, max_position_embeddings=patches + 128 + chunk_length * 8
    )
    return VLAConfig(
        vision_config=vision,
        text_config=text,
        action_dim=action_dim,
        proprio_dim=proprio_dim,
        chunk_length=chunk_length,
        camera_names=camera_names or ["main"],
        preset=preset,
    )


class VLAPolicy(PreTrainedModel):
    """Observation + instruction -> logits over the bins of every action token of a chunk."""

    config_class = VLAConfig
    base_model_prefix = "vla"
    main_input_name = "pixel_values"

    def __init__(self, config: VLAConfig) -> None:
        super().__init__(config)
        vision_cfg: Any = config.vision_config
        text_cfg: Any = config.text_config
        hidden = int(text_cfg.hidden_size)
        self.vision = SiglipVisionModel(vision_cfg)
        self.language = LlamaModel(text_cfg)
        self.image_projection = nn.Linear(int(vision_cfg.hidden_size), hidden)
        self.proprio_projection = nn.Linear(max(config.proprio_dim, 1), hidden)
        self.action_queries = nn.Parameter(torch.zeros(config.chunk_length * config.action_dim, hidden))
        self.action_head = nn.Linear(hidden, config.num_bins)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if module is self:
            nn.init.normal_(self.action_queries, std=0.02)

    def forward(
        self,
        pixel_values: torch.Tensor,  # float [B, cameras, 3, H, W] in [-1, 1]
        proprio: torch.Tensor,  # float [B, P], already scaled
        input_ids: torch.Tensor,  # long [B, L], instruction tokens padded on either side
        attention_mask: torch.Tensor,  # long [B, L], 1 on real tokens, 0 on padding
    ) -> torch.Tensor:
        """float32 logits [B, T, A, num_bins]."""
        cfg = self.config
        batch = pixel_values.shape[0]
        flat = pixel_values.flatten(0, 1).to(self.dtype)
        patches = self.vision(pixel_values=flat).last_hidden_state
        image_tokens = self.image_projection(patches).reshape(batch, -1, self.action_queries.shape[1])
        if cfg.proprio_dim > 0:
            state = self.proprio_projection(proprio.to(self.dtype))[:, None]
        else:
            state = self.proprio_projection(torch.zeros(batch, 1, device=flat.device, dtype=self.dtype))[:, None]
        words = self.language.embed_tokens(input_ids)
        queries = self.action_queries[None].expand(batch, -1, -1).to(words.dtype)
        embeds = torch.cat([image_tokens.to(words.dtype), state.to(words.dtype), words, queries], dim=1)
        ones = attention_mask.new_ones
        mask = torch.cat(
            [ones((batch, image_tokens.shape[1] + 1)), attention_mask, ones((batch, queries.shape[1]))], dim=1
        )
        hidden = self.language(
            inputs_embeds=embeds, attention_mask=mask, position_ids=positions_from_mask(mask)
        ).last_hidden_state
        logits = self.action_head(hidden[:, -queries.shape[1] :]).float()
        shaped: torch.Tensor = logits.reshape(batch, cfg.chunk_length, cfg.action_dim, cfg.num_bins)
        return shaped


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Position ids [B, S] that count only the attended tokens of each row (padding gets 0 and is never attended).

    Without them Llama numbers the padded sequence 0..S-1, so padding a shorter instruction up to the batch's
    longest moves the action queries (and changes every logit of the row): with these, a row sees the positions
    it has alone, whatever its batch and wherever the padding is.
    """
    positions = mask.long().cumsum(-1) - 1
    return positions.masked_fill(mask == 0, 0)


def scaled_log_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """log-softmax of logits / temperature (temperature 0 means greedy; its log-probs use temperature 1)."""
    return torch.log_softmax(logits / (temperature if temperature > 0 else 1.0), dim=-1)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    """Log-probability of given tokens [B, T, A] under the sampling distribution of `temperature`."""
    return scaled_log_probs(logits, temperature).gather(-1, tokens[..., None]).squeeze(-1)


def sample_tokens(
    logits: torch.Tensor, temperatures: list[float], seeds: list[int | None]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample each row with its own temperature and seed (Gumbel-max); greedy rows take the argmax.

    Returns (tokens long [B, T, A], log-probs float [B, T, A]). A seeded row gives the same tokens whatever
    else is in the batch.
    """
    tokens = torch.empty(logits.shape[:-1], dtype=torch.long, device=logits.device)
    logps = torch.empty(logits.shape[:-1], dtype=torch.float32, device=logits.device)
    for row, (temperature, seed) in enumerate(zip(temperatures, seeds, strict=True)):
        logp = scaled_log_probs(logits[row], temperature)
        if temperature > 0:
            generator = torch.Generator(device="cpu")
            if seed is None:
                generator.seed()
            else:
                generator.manual_seed(int(seed))
            uniform = torch.rand(logp.shape, generator=generator).clamp_(1e-12, 1.0).to(logp.device)
            choice = (logp - torch.log(-torch.log(uniform))).argmax(-1)
        else:
            choice = logp.argmax(-1)
        tokens[row] = choice
        logps[row] = logp.gather(-1, choice[..., None]).squeeze(-1)
    return tokens, logps
