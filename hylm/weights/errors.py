class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded into the model its config describes; the message says why."""
