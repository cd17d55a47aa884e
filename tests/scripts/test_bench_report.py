"""The benchmark report's arithmetic: the profile notes and `bench_all.py --merge` (no timing here)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import bench_all  # noqa: E402
import bench_report  # noqa: E402

ARCH = {"vocab_size": 100, "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 1}


def _side(tokens_per_s, peak, op_ms, matmul_ms, saved):
    return {"tokens_per_s": tokens_per_s, "peak_mib": peak, "abs_peak_mib": peak + 100,
            "profile": {"op_ms": op_ms, "matmul_ms": matmul_ms, "saved_mib": saved, "top_ops": [["aten::mm", matmul_ms]]}}


def _model_run(seq):
    return {"bench": "model", "device": "cpu", "seq": seq, "batch": 1, "arch": ARCH, "n_params": 2**20,
            "train": {"ours": _side(110, 300, 1000, 800, 90), "hf-sdpa": _side(100, 400, 1100, 800, 150)},
            "decode": {"ours": {"tokens_per_s": 60}, "hf-sdpa": {"tokens_per_s": 50, "same_tokens": True}},
            "run": {"gemv_floor_s": 0.01}}


def test_profile_notes_carry_the_measured_shares_and_the_fixed_optimizer_state():
    section = {"peaks": [{"gflops": 100.0}], "peak_gflops": 100.0, "model-512": _model_run(512)}
    text = "\n".join(bench_report.why_missed(section))
    assert "0.80 s of 1.00 s op time in ours (80%)" in text
    assert "at most 1.38x transformers" in text  # their 1.1 s over our 0.8 s of matmuls: the most a faster rest could give
    # 2^20 weights x 12 bytes = 12 MiB of gradients and moments; (300 - 12) / (400 - 12)
    assert "12 MiB of gradients" in text and f"{288 / 388:.2f}x" in text
    assert "198 MiB (ours) and 238 MiB (transformers) are transient" in text  # 300 - 12 - 90, 400 - 12 - 150
    assert "100 new tokens/s" in text and "2.00x transformers' 50 tokens/s; ours reaches 60, 60% of the cap" in text
    assert "room for 2x" in text


def test_a_bench_without_profiles_adds_no_note():
    run = _model_run(512)
    for side in run["train"].values():
        side.pop("profile")
    run["run"]["gemv_floor_s"] = None
    assert bench_report.why_missed({"peaks": [], "peak_gflops": 1.0, "model-512": run}) == []


def test_merge_keeps_the_benches_not_rerun_and_every_peak(tmp_path):
    old = {"quick": False, "benches": ["model", "sft"], "run": {"command": "python scripts/bench_all.py", "date": "d0"},
           "cpu": {"peaks": [{"gflops": 150.0}], "peak_gflops": 150.0, "model-512": {"bench": "model", "old": True},
                   "model-2048": {"bench": "model"}, "sft": {"bench": "sft", "old": True}},
           "cuda": {"not_run": "no GPU"}}
    (tmp_path / "benchmarks.json").write_text(json.dumps(old))
    new = {"quick": False, "benches": ["model"], "run": {"command": "x", "date": "d1"},
           "cpu": {"peaks": [{"gflops": 140.0}], "peak_gflops": 140.0, "model-512": {"bench": "model", "old": False},
                   "model-2048": {"bench": "model"}},
           "cuda": {"not_run": "no GPU"}}
    out = bench_all.merged(new, tmp_path / "benchmarks.json")
    assert out["cpu"]["model-512"]["old"] is False and out["cpu"]["sft"]["old"] is True
    assert out["cpu"]["peak_gflops"] == 150.0 and len(out["cpu"]["peaks"]) == 2
    assert out["benches"] == ["sft", "model"] and out["kept"] == {"sft": {"command": "python scripts/bench_all.py", "date": "d0"}}
    assert "Kept from an earlier run (`python scripts/bench_all.py`, d0): sft;" in "\n".join(bench_report._merge_notes(out["kept"]))
    # merged again: sft still names the run that measured it, model the run before this one
    (tmp_path / "benchmarks.json").write_text(json.dumps({**out, "run": {"command": "x", "date": "d1"}}))
    again = bench_all.merged({**new, "benches": ["dist"], "cpu": {"peaks": [], "peak_gflops": 0, "dist": {}}},
                             tmp_path / "benchmarks.json")
    assert again["kept"] == {"sft": {"command": "python scripts/bench_all.py", "date": "d0"},
                             "model": {"command": "x", "date": "d1"}}


def test_merge_refuses_a_missing_file_and_a_quick_run_into_a_full_one(tmp_path):
    new = {"quick": True, "benches": ["model"], "cpu": {}, "cuda": {"not_run": ""}}
    with pytest.raises(SystemExit, match="does not exist"):
        bench_all.merged(new, tmp_path / "benchmarks.json")
    (tmp_path / "benchmarks.json").write_text(json.dumps({"quick": False}))
    with pytest.raises(SystemExit, match="merge like with like"):
        bench_all.merged(new, tmp_path / "benchmarks.json")


def test_merge_on_a_machine_without_a_gpu_keeps_the_earlier_gpu_section(tmp_path):
    gpu = {"peaks": [{"gflops": 900.0}], "peak_gflops": 900.0, "model-512": {"bench": "model"}}
    old = {"quick": False, "benches": ["model"], "run": {"command": "c", "date": "d0"},
           "cpu": {"peaks": [{"gflops": 150.0}], "peak_gflops": 150.0, "model-512": {"bench": "model"}}, "cuda": gpu}
    (tmp_path / "benchmarks.json").write_text(json.dumps(old))
    new = {"quick": False, "benches": ["dist"], "run": {"command": "x", "date": "d1"},
           "cpu": {"peaks": [{"gflops": 140.0}], "peak_gflops": 140.0, "dist": {"bench": "dist"}},
           "cuda": {"not_run": "no GPU"}}
    out = bench_all.merged(new, tmp_path / "benchmarks.json")
    assert out["cuda"] == gpu and set(out["cpu"]) == {"peaks", "peak_gflops", "model-512", "dist"}
