"""Checkpoints: training state and atomic folder writes (HF model folders: model/hf.py)."""
