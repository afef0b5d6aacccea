"""The reward model (a video success classifier): model, checkpoint, train, metrics, cli."""
