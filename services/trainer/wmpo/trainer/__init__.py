"""The trainer service: the orchestrator, rollout workers, the GRPO learner, world-model alignment,
and the control-plane HTTP API. Nothing outside this package imports it."""
