"""megarnn: distributed pretraining of large recurrent language models."""
__version__ = "0.1.0"


def load(path, device="cpu"):
    """(model, tokenizer) from a run directory, a checkpoints directory or one checkpoint."""
    from megarnn.loading import load as _load
    return _load(path, device)
