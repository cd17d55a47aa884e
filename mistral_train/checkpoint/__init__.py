"""Checkpoints: HF folders in and out, training state, atomic writes."""
