"""Benchmark our Mixtral MoE training step against transformers' MixtralForCausalLM on the same config.

A training step is what the loop optimises: forward, the causal-LM loss plus router_aux_loss_coef x the
load-balancing loss (ours: model/moe.py's, recorded by the forward; transformers: output_router_logits=True),
backward, an AdamW step. Sides: ours (experts recomputed in backward: model/expert_recompute.py); ours-plain (the
same model keeping every expert intermediate); transformers with its default experts implementation (grouped_mm where
torch has it); transformers with experts_implementation="eager" (a Python loop over experts). Each side runs in
its own child process (peak memory apart), timed steps go round-robin; all sides get the same weights (one
state dict in safetensors: our in-memory names are transformers') and the same batch. lr 1e-3, so each side is
also checked to train: its gradient norm is non-zero and its loss moves over the steps.

Two peaks per side: over the built model (the whole step, so AdamW's two moments, created by the first step,
count: 12 bytes a parameter with the gradients, alike on both sides) and, after the warm-up steps, over the model
plus that optimizer state (what a step adds on top: activations, gradients, transients: where MoE dispatch
differs). On CPU the peak is the RSS high-water mark. glibc's malloc raises its mmap threshold as large tensors
are freed and then keeps freed heap resident, so by default that mark includes retained heap, which moved a side
by tens of MiB between runs. --live-memory runs the children with MALLOC_MMAP_THRESHOLD_=65536: every tensor over
64 KiB is its own mapping, returned on free, and the mark follows the live tensors (as max_memory_allocated does
on CUDA); every allocation then page-faults, which slows all sides several-fold, so take speed from a default run.
--checkpointing block runs both sides with whole-layer activation checkpointing (ours
set_gradient_checkpointing("block"), transformers gradient_checkpointing_enable, non-reentrant).
Prints a markdown block for docs/benchmarks.md and a JSON line for bench_all.py.

    python scripts/bench_moe.py [--seq 256] [--batch 4] [--warmup 1] [--steps 4] [--device cpu|cuda|auto] [--quick]
                                [--live-memory] [--checkpointing none|block]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared bench helper beside this file
import _bench_common as mem  # noqa: E402

from mistral_train import Mistral, MistralConfig  # noqa: E402
from mistral_train.model.moe import Experts, take_aux_loss  # noqa: E402

# side -> transformers' experts_implementation; ours-plain: ours with Experts.recompute off (autograd keeps every
# expert intermediate), which prices model/expert_recompute.py's saving in the same run
SIDES = {"ours": None, "ours-plain": None, "hf-grouped_mm": "grouped_mm", "hf-eager": "eager"}
ARCH = dict(model_type="mixtral", vocab_size=4096, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
            num_attention_heads=8, num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2,
            router_aux_loss_coef=0.02, sliding_window=None, max_position_embeddings=4096, tie_word_embeddings=False)
QUICK_ARCH = {**ARCH, "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2}
MMAP_THRESHOLD = "65536"  # bytes: see the module docstring


class StepMemory:
    """A child's two peaks: over the built model (every step) and over the model plus the optimizer state, read
    from a reset made after the warm-up steps (`settle`). The whole-step peak is the larger of the two spans."""

    def __init__(self, device: str) -> None:
        self.device, self.whole, self.first, self.steady = device, mem.PeakMemory(device), None, None

    def settle(self) -> dict:
        self.first = self.whole.read()  # the peak of the steps so far, over the model
        self.steady = mem.PeakMemory(self.device)
        self.steady.start()
        return {}

    def read(self) -> dict:
        now = self.steady.read()
        whole = {**self.first, "peak_mib": max(self.first["peak_mib"], now["peak_mib"])}
        whole["peak_reset"] = self.first["peak_reset"] and now["peak_reset"]
        return {**whole, "steady_baseline_mib": now["baseline_mib"], "steady_mib": now["peak_mib"] - now["baseline_mib"]}


def build(side: str, weights: Path, arch: dict, checkpointing: str = "none") -> torch.nn.Module:
    config = MistralConfig.from_hf_dict(arch, source="bench")
    if side.startswith("ours"):
        model = Mistral(config)
        for module in model.modules():
            if isinstance(module, Experts):
                module.recompute = side == "ours"
    else:
        hf_config = transformers.MixtralConfig(**{k: v for k, v in config.to_hf_dict("MistralForCausalLM").items()
                                                  if k not in ("architectures", "model_type")})
        hf_config._attn_implementation = "sdpa"
        model = transformers.MixtralForCausalLM(hf_config)
        model.set_experts_implementation(SIDES[side])
    model.load_state_dict(load_file(weights), strict=True)
    if checkpointing == "block":  # the memory lever each library offers for the whole layer
        if side.startswith("ours"):
            model.set_gradient_checkpointing("block")
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def serve_side(side: str, weights: Path, args: argparse.Namespace) -> None:
    torch.set_num_threads(mem.THREADS)
    device = args.device
    model = build(side, weights, args.arch, args.checkpointing).to(device, mem.compute_dtype(device))
    ids = torch.randint(0, args.arch["vocab_size"], (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    seen = {"losses": [], "grad_norms": []}

    def step() -> float:
        model.train()
        if side.startswith("ours"):
            loss = model(ids, labels=ids) + take_aux_loss(model)[0]  # what train/loop.py backward_window adds
        else:
            loss = model(ids, labels=ids, use_cache=False, output_router_logits=True).loss
        loss.backward()
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None]))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seen["losses"].append(loss.item())
        seen["grad_norms"].append(float(norm))
        return loss.item()

    memory = StepMemory(device)
    memory.whole.start()  # the model is built: its load's transient copies do not count

    def one_step() -> dict:
        seconds, loss = mem.timed(step, device)
        return {"s": seconds, "loss": loss}

    mem.serve({"step": one_step, "settle": memory.settle, "memory": memory.read, "trained": lambda: dict(seen),
               "profile": lambda: mem.profile_step(step, device)})


def report(train: dict, trained: dict, args: argparse.Namespace, settings: dict) -> str:
    sides, arch, info = list(train), args.arch, settings["machine"]
    others = [s for s in sides if s != "ours"]
    rows = ["| Measure | ours | " + " | ".join(f"{s} | ours / {s}" for s in others) + " |",
            "|---|---:|" + "---:|---:|" * len(others)]
    for name, key, fmt in (("Train step, tokens/s, median step (higher is better)", "tokens_per_s", "{:.0f}"),
                           ("Train step, tokens/s, best step", "best_tokens_per_s", "{:.0f}"),
                           ("Train step, peak memory over the built model, MiB (lower is better)", "peak_mib", "{:.0f}"),
                           ("Train step, absolute peak memory, MiB", "abs_peak_mib", "{:.0f}"),
                           ("Train step, peak over model + AdamW state (after warm-up), MiB", "steady_mib", "{:.0f}")):
        cells = [name, fmt.format(train["ours"][key])]
        for s in others:
            cells += [fmt.format(train[s][key]), f"{train['ours'][key] / train[s][key]:.2f}x"]
        rows.append("| " + " | ".join(cells) + " |")
    lines = [
        f"- Machine: {info['cpu']}, {info['cores']} cores, {info['ram_gib']} GiB, torch.set_num_threads({mem.THREADS}); "
        f"{args.device}; {mem.versions_text(info)}; {mem.compute_dtype(args.device)}.",
        f"- Model: Mixtral, hidden {arch['hidden_size']}, {arch['num_hidden_layers']} layers, {arch['num_local_experts']} "
        f"experts top-{arch['num_experts_per_tok']} of intermediate {arch['intermediate_size']}, {arch['num_attention_heads']} "
        f"heads / {arch['num_key_value_heads']} KV, vocab {arch['vocab_size']}: {settings['n_params'] / 1e6:.1f} M parameters.",
        f"- Step: batch {args.batch} x seq {args.seq}, CE + {arch['router_aux_loss_coef']} x aux loss, backward, AdamW "
        f"(lr 1e-3); {args.warmup} warm-up + {args.steps} timed steps per side, round-robin. Step seconds: "
        + "; ".join(f"{s} " + ", ".join(f"{t:.2f}" for t in train[s]["step_s"]) for s in sides) + ".",
        "- Trained: " + "; ".join(f"{s} loss {t['losses'][0]:.4f} -> {t['losses'][-1]:.4f}, grad norm first step "
                                  f"{t['grad_norms'][0]:.3g}" for s, t in trained.items()) + ".",
        mem.memory_note([settings["memory"][s] for s in sides]),
        f"- Allocator: {settings['allocator']}; activation checkpointing: {args.checkpointing} (both sides); "
        "AdamW state after warm-up (the second peak's baseline over the first's), MiB: "
        + ", ".join(f"{s} {settings['memory'][s]['steady_baseline_mib'] - settings['memory'][s]['baseline_mib']:.0f}"
                    for s in sides) + ".",
        mem.profile_note({s: train[s]["profile"] for s in sides}),
    ]
    return "\n".join(lines + mem.run_notes(settings) + ["", *rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    parser.add_argument("--quick", action="store_true", help="tiny model, 2 steps: a smoke test")
    parser.add_argument("--live-memory", action="store_true", help="CPU: MALLOC_MMAP_THRESHOLD_, see above")
    parser.add_argument("--checkpointing", default="none", choices=("none", "block"))
    parser.add_argument("--child", choices=list(SIDES), help=argparse.SUPPRESS)
    parser.add_argument("--weights", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.device, args.arch = mem.pick_device(args.device), QUICK_ARCH if args.quick else ARCH
    if args.quick:
        args.seq, args.batch, args.warmup, args.steps = 64, 2, 0, 2
    if args.child:
        serve_side(args.child, args.weights, args)
        return
    torch.set_num_threads(mem.THREADS)
    clock = mem.RunClock(__file__)
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "weights.safetensors"
        torch.manual_seed(0)
        state = Mistral(MistralConfig.from_hf_dict(args.arch, source="bench")).state_dict()
        n_params = sum(v.numel() for v in state.values())
        save_file(state, str(weights))
        argvs = {s: [__file__, *sys.argv[1:], "--child", s, "--weights", str(weights)] for s in SIDES}
        allocator = "glibc malloc defaults (RSS includes heap glibc retains)"
        if args.device == "cpu" and args.live_memory:  # read by each child's glibc at start, not by this process
            os.environ["MALLOC_MMAP_THRESHOLD_"] = MMAP_THRESHOLD
            allocator = f"MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD} (RSS follows live tensors)"
        with mem.children_of(argvs) as children:
            settle_after = max(args.warmup, 1)  # the optimizer state exists after one step
            steps = mem.round_robin(children, "step", settle_after)
            for child in children.values():
                child.ask("settle")
            more = mem.round_robin(children, "step", args.warmup + args.steps - settle_after)
            steps = {s: steps[s] + more[s] for s in steps}
            memory = {s: child.ask("memory") for s, child in children.items()}
            profiles = {s: child.ask("profile") for s, child in children.items()}
            trained = {s: child.ask("trained") for s, child in children.items()}
    for side, t in trained.items():
        if not (t["grad_norms"][0] > 0 and t["losses"][-1] != t["losses"][0]):
            raise SystemExit(f"{side} did not train: losses {t['losses']}, grad norms {t['grad_norms']}")
    train = {s: {**mem.summarize({"steps": steps[s], "memory": memory[s], "profile": profiles[s]},
                                 args.batch * args.seq, args.warmup), "steady_mib": memory[s]["steady_mib"]}
             for s in SIDES}
    settings = {**clock.finish(), "n_params": n_params, "memory": memory, "allocator": allocator}
    payload = {"bench": "moe", "device": args.device, "seq": args.seq, "batch": args.batch, "arch": args.arch,
               "allocator": allocator, "checkpointing": args.checkpointing,
               "n_params": n_params, "train": train, "trained": trained, "run": settings}
    mem.emit(report(train, trained, args, settings), payload)


if __name__ == "__main__":
    main()
