"""Checkpoints: training state, atomic folder writes, integrity manifests (HF model folders: model/hf.py)."""
