"""Training: `fit()` runs any objective through one loop; optimizer and schedule in optim.py."""

__all__ = ["fit"]


def __getattr__(name: str):
    # Imported on first use so that `mistral_train.train.optim` (and steps) load without the
    # whole stack fit() needs (tokenizer, generation, plotting, trackers).
    if name == "fit":
        from mistral_train.train.loop import fit

        return fit
    raise AttributeError(f"module 'mistral_train.train' has no attribute {name!r}")
