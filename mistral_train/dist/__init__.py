"""Several processes through Accelerate and DeepSpeed.

accelerator.py  the Accelerator of a run, backward/no_sync/clip through it, release
strategy.py     which strategy (single, ddp, fsdp2, zero1-3) a run uses, checked against the launcher
fsdp.py         FSDP2 (`fully_shard`) of our model, also on CPU
gather.py       the full model gathered from shards, for evaluation and saving
"""
