"""Training data: read rows (sources), tokenize (text, sft), audit, pack or pad, batch (batches)."""

from mistral_train.data.batches import EpochBatches, TrainData, build_batches

__all__ = ["EpochBatches", "TrainData", "build_batches"]
