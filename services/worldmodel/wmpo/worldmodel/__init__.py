"""The world-model ("dream") service: the action-conditioned video diffusion model, the reward model,
their training and evaluation, Triton serving, and the gRPC Imagination API."""
