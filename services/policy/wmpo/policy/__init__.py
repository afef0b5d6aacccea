"""The VLA policy: model, checkpoint, train, metrics, cli (+ tokenizer, actions, sim_source); serving in `serving/`."""
