"""bench_sft.py's children: our SFT loop and trl.SFTTrainer, each as command handlers ("warmup", "epoch").

The settings both sides share live here too; bench_sft.py (the parent, data and report) imports them.
"""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

import _bench_common as mem
from mistral_train import Mistral, MistralConfig
from mistral_train.config import TrainerSpec
from mistral_train.data.collate import collate_packed, collate_padded
from mistral_train.data.packing import epoch_order, pack_examples
from mistral_train.data.sft import SFTExample
from mistral_train.losses.ce import IGNORE_INDEX
from mistral_train.train.loop import backward_window
from mistral_train.train.optim import build_optimizer, build_scheduler
from mistral_train.train.steps import language_model

THREADS = mem.THREADS
SEED = 0
ARCH = dict(vocab_size=32000, hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, sliding_window=None, tie_word_embeddings=False, max_position_embeddings=2048)
MAX_LEN = 512  # packed row length and the longest example
PACKED_ROWS = 2  # rows per step when packed (~1000 real tokens)
PADDED_BATCH = 8  # examples per step when padded (~1000 real tokens on this data)
MAX_TURNS = 20
SIDES = ("ours-packed", "ours-padded", "trl-padded", "trl-packed")
LR, WEIGHT_DECAY, CLIP = 1e-3, 0.1, 1.0
QUICK_EXAMPLES = 12


def trainer_spec(steps: int, batch_size: int, device: str) -> TrainerSpec:
    return TrainerSpec(objective="pretrain", max_steps=steps, max_seq_len=MAX_LEN, batch_size=batch_size, lr=LR,
                       min_lr_ratio=0.0, warmup_steps=0, weight_decay=WEIGHT_DECAY, beta1=0.9, beta2=0.999,
                       grad_clip=CLIP, device=device)


# ---- children: one per side; each returns its command handlers ("warmup", "epoch", "memory" is added)


def our_side(packed: bool, examples: list[SFTExample], pad_id: int, weights: Path, out: Path, device: str,
             precision: str) -> dict:
    """Our model driven as fit() drives it: collate, backward_window, clip, AdamW step (over bf16 weights
    trainer.bf16_update's default, Kahan), schedule step; `precision` one of _bench_common.PRECISIONS."""
    model = Mistral(MistralConfig(**ARCH))
    model.load_state_dict(load_file(weights), strict=True)
    model.to(device, mem.weight_dtype(precision)).train()
    autocast = mem.autocast(precision, device)
    objective = language_model()
    if packed:
        rows = pack_examples(examples, MAX_LEN)  # once, up front, as the loop does
        items = [rows[i] for i in epoch_order(len(rows), SEED, 0)]
        size, collate = PACKED_ROWS, lambda chunk: collate_packed(chunk, pad_id)
    else:
        items, size, collate = examples, PADDED_BATCH, lambda chunk: collate_padded(chunk, pad_id, MAX_LEN)
    chunks = [items[i : i + size] for i in range(0, len(items), size)]
    state: dict = {}

    def step(chunk) -> tuple[float, int, int]:
        batch = collate(chunk)  # timed: trl collates inside its loop too
        pad = batch.pop("pad_mask") if "pad_mask" in batch else batch["attention_mask"] == 0
        batch = {k: v.to(device) for k, v in batch.items()}
        loss, _, _ = backward_window(model, objective, [batch], autocast)
        state["grad_norms"].append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)))
        state["optimizer"].step()
        state["optimizer"].zero_grad(set_to_none=True)
        state["scheduler"].step()
        return loss, int((~pad).sum()), pad.numel()

    def start(steps: int) -> None:
        """A fresh AdamW and schedule, as each trl run builds its own (not timed on either side)."""
        spec = trainer_spec(steps, size, device)
        state["optimizer"] = build_optimizer(model, spec)
        state["scheduler"] = build_scheduler(state["optimizer"], spec)
        state["grad_norms"] = []

    def warmup() -> dict:
        start(1)
        return {"loss": step(chunks[0])[0]}

    def epoch() -> dict:
        start(len(chunks))
        losses, real, slots = [], 0, 0
        wall, cpu = time.perf_counter(), time.process_time()
        for chunk in chunks:
            loss, n_real, n_slots = step(chunk)
            losses.append(loss)
            real, slots = real + n_real, slots + n_slots
        if device == "cuda":
            torch.cuda.synchronize()
        return {"s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu, "steps": len(chunks),
                "real": real, "slots": slots, "first_loss": losses[0], "mean_loss": sum(losses) / len(losses),
                "last_loss": losses[-1], "grad_norms": state["grad_norms"]}

    return {"warmup": warmup, "epoch": epoch}


def trl_side(packed: bool, examples: list[SFTExample], pad_id: int, weights: Path, out: Path, device: str,
             precision: str) -> dict:
    """trl.SFTTrainer over the same ids and assistant masks; PEFT off, no activation checkpointing;
    `precision`: fp32, bf16-autocast (fp32 weights, bf16=True: accelerate's autocast) or bf16 (bf16
    weights, bf16=True, its plain AdamW over them)."""
    import datasets
    import transformers
    import trl

    datasets.disable_progress_bars()
    transformers.utils.logging.set_verbosity_error()
    hf_config = transformers.MistralConfig(**MistralConfig(**ARCH).to_hf_dict())
    hf_config._attn_implementation = "sdpa"
    model = transformers.MistralForCausalLM(hf_config)
    model.load_state_dict(load_file(weights), strict=True)
    model.to(mem.weight_dtype(precision))
    tokenizer = transformers.AutoTokenizer.from_pretrained(out / "tokenizer")
    if tokenizer.convert_tokens_to_ids(tokenizer.eos_token) != pad_id:
        raise RuntimeError(f"the HF tokenizer's EOS is not id {pad_id}; the two sides would pad differently")
    dataset = datasets.Dataset.from_dict({
        "input_ids": [e.input_ids for e in examples],
        "assistant_masks": [[int(label != IGNORE_INDEX) for label in e.labels] for e in examples],
    })
    counts = {"real": 0, "slots": 0}

    class Clock(transformers.TrainerCallback):
        """Wall time of the training loop alone (dataset preparation and optimizer creation excluded)."""

        def on_train_begin(self, args, state, control, **kwargs):
            self.wall, self.cpu, self.threads = time.perf_counter(), time.process_time(), torch.get_num_threads()

        def on_train_end(self, args, state, control, **kwargs):
            if device == "cuda":
                torch.cuda.synchronize()
            self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu

    def trainer(max_steps: int, clock: Clock):
        args = trl.SFTConfig(
            output_dir=str(out / "trl"), report_to=[], bf16=precision != "fp32", fp16=False, use_cpu=device == "cpu", seed=SEED,
            max_steps=max_steps, num_train_epochs=1, per_device_train_batch_size=PACKED_ROWS if packed else PADDED_BATCH,
            train_sampling_strategy="sequential", learning_rate=LR, optim="adamw_torch", weight_decay=WEIGHT_DECAY,
            max_grad_norm=CLIP, lr_scheduler_type="cosine", warmup_steps=0, packing=packed, packing_strategy="bfd",
            max_length=MAX_LEN, activation_checkpointing=False, logging_steps=1, save_strategy="no",
            disable_tqdm=True, dataloader_pin_memory=False,
        )
        built = trl.SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                               callbacks=[clock])
        collate = built.data_collator

        def counting(features):
            batch = collate(features)
            mask = batch.get("attention_mask")  # absent when padding-free: then nothing is padding
            counts["real"] += int(mask.sum()) if mask is not None else batch["input_ids"].numel()
            counts["slots"] += batch["input_ids"].numel()
            return batch

        built.data_collator = counting
        return built

    def warmup() -> dict:
        clock = Clock()
        run = trainer(1, clock)
        with contextlib.redirect_stdout(sys.stderr):  # trl prints its logs; stdout carries our answers
            run.train()
        return {"loss": run.state.log_history[0]["loss"]}

    def epoch() -> dict:
        clock = Clock()
        run = trainer(-1, clock)
        counts.update(real=0, slots=0)
        with contextlib.redirect_stdout(sys.stderr):
            run.train()
        losses = [entry["loss"] for entry in run.state.log_history if "loss" in entry]
        if clock.threads != THREADS:
            raise RuntimeError(f"trl trained on {clock.threads} threads, expected {THREADS}")
        return {"s": clock.wall, "cpu_s": clock.cpu, "steps": run.state.global_step, "real": counts["real"], "slots": counts["slots"],
                "first_loss": losses[0], "mean_loss": sum(losses) / len(losses), "last_loss": losses[-1],
                "grad_norms": [float(e["grad_norm"]) for e in run.state.log_history if "grad_norm" in e]}

    return {"warmup": warmup, "epoch": epoch}
