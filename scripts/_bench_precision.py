"""The "bf16 on CPU (issue 18 item 1)" table of docs/benchmarks.md: every training-step bench in each precision.

bench_all.py runs the model, LoRA/QLoRA, DPO and SFT benches once more with `--precision bf16-autocast` and
`--precision bf16` (PRECISION_RUNS), or, on a CPU without bf16 units, records why not ({"skipped": ...}).
This module lines those runs up with the default-precision (fp32) ones: ours vs the peer per workload and
precision, against issue 18's aim (>= 1.2x in every precision), with MFU against the measured matmul peak
of the dtype the matmuls ran in (fp32 for fp32, bf16 for both bf16 settings).
"""

from __future__ import annotations

from typing import Callable, Iterator, Optional

import _bench_common as mem

TARGET = 1.2  # issue 18 item 1: every training-step row >= 1.2x the peer, in each precision
PRECISION_BENCHES = ("model", "lora", "dpo", "sft")
# Extra arguments of the bf16 runs: one shape each, so the suite's time grows by a bounded amount.
PRECISION_ARGS = {"model": ["--no-decode", "--no-eager"], "lora": ["--shapes", "512x4"], "dpo": ["--grad-ckpt", "off"],
                  "sft": ["--no-trl-packed"]}
QUICK_PRECISION_ARGS = {"lora": ["--shapes", "64x2"]}


def precision_runs(name: str, label: str, argv: list[str], quick: bool) -> list[tuple[str, list[str]]]:
    """The bf16 variants of one default run (label, argv) of bench `name`: `label-bf16-autocast`, `label-bf16`.
    The model bench has two default runs (two lengths): only its first gets bf16 variants."""
    if name not in PRECISION_BENCHES or (name == "model" and "--no-decode" in argv):
        return []
    extra = QUICK_PRECISION_ARGS.get(name, PRECISION_ARGS[name]) if quick else PRECISION_ARGS[name]
    return [(f"{label}-{p}", [*argv, *extra, "--precision", p]) for p in mem.PRECISIONS if p != "fp32"]


def is_variant(r: dict) -> bool:
    """A run made with an explicit --precision (a bf16 variant), not a default-precision run."""
    return "--precision" in r.get("run", {}).get("command", "")


def _sides(r: dict, flops: Callable[..., float]) -> Iterator[tuple[str, str, dict, dict, Optional[float]]]:
    """(bench, workload, ours, peer, model FLOPs per token or None) of every comparison in one bench payload."""
    if r["bench"] == "model":
        yield ("model", f"full step, seq {r['seq']} x {r['batch']} (vs transformers)", r["train"]["ours"],
               r["train"]["hf-sdpa"], flops(r["arch"], r["seq"]))
    elif r["bench"] == "lora":
        for row in r["rows"]:
            yield ("lora", f"{row['kind']} step, seq {row['seq']} x {row['batch']} (vs transformers+peft)", row["ours"],
                   row["peft"], flops(r["arch"], row["seq"], lora_r=r["lora"]["r"]))
    elif r["bench"] == "dpo":
        for row in r["rows"]:
            yield ("dpo", f"DPO {row['reference']}, checkpointing {row['grad_ckpt']}, seq {row['seq']} (vs trl)",
                   row["ours"], row["trl"], None)
    elif r["bench"] == "sft":
        peer = "trl-packed" if "trl-packed" in r["sides"] else "trl-padded"
        yield ("sft", f"SFT epoch, ours packed vs {peer.replace('-', ' ')}", r["sides"]["ours-packed"], r["sides"][peer], None)


def table(section: dict, flops: Callable[..., float]) -> list[str]:
    """Markdown lines of the table (empty when the section has no bf16 variant, run or skipped)."""
    variants = {label: r for label, r in section.items() if isinstance(r, dict)
                and ("skipped" in r or (r.get("bench") in PRECISION_BENCHES and is_variant(r)))}
    if not variants:
        return []
    peaks = {"fp32": section.get("peak_gflops"), "bf16": section.get("peak_gflops_bf16")}
    rows = []
    for label, r in section.items():
        if not isinstance(r, dict) or label in ("peaks", "peak_gflops", "peaks_bf16", "peak_gflops_bf16"):
            continue
        if "skipped" in r:
            rows.append(f"| {label} | | | | | >= {TARGET:g}x | {r['skipped']} | | |")
            continue
        if "error" in r or r.get("bench") not in PRECISION_BENCHES:
            continue
        precision = r.get("precision", "fp32")
        if not is_variant(r) and precision != "fp32":
            continue
        peak = peaks["fp32" if precision == "fp32" else "bf16"]
        for _, workload, ours, peer, per_token in _sides(r, flops):
            ratio = ours["tokens_per_s"] / peer["tokens_per_s"]
            mfu = (f"{ours['tokens_per_s'] * per_token / (peak * 1e9):.0%} ({peer['tokens_per_s'] * per_token / (peak * 1e9):.0%})"
                   if per_token and peak else "")
            trained = "yes" if "grad_norms" in ours and mem.trained(ours) and mem.trained(peer) else (
                "not recorded" if "grad_norms" not in ours else "**NO**")
            rows.append(f"| {workload} | {precision} | {ours['tokens_per_s']:.0f} | {peer['tokens_per_s']:.0f} | "
                        f"{ratio:.2f}x | >= {TARGET:g}x | {'met' if ratio >= TARGET else '**missed**'} | {mfu} | {trained} |")
    peak_text = ", ".join(f"{dtype} {value:.0f} GFLOP/s" for dtype, value in peaks.items() if value)
    return ["### bf16 on CPU (issue 18 item 1)", "",
            f"Each training-step bench in fp32, bf16 autocast (fp32 weights) and pure bf16 weights; MFU against the "
            f"measured matmul peak of the dtype the matmuls ran in ({peak_text or 'not measured'}); trained: every step "
            "of both sides had a nonzero gradient norm and moved its weights, and the loss changed.", "",
            "| Workload | precision | ours tokens/s | peer tokens/s | ours / peer | target | verdict | MFU ours (peer) | trained |",
            "|---|---|---:|---:|---:|---:|---|---:|---|", *rows, ""]
