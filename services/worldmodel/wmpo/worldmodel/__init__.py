"""The world model: model, checkpoint, train, metrics, cli (plus rollout_rules); `reward/` and `serving/` beside."""
