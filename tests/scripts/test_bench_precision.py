"""Benches in fp32, bf16 autocast and pure bf16 (issue 18 item 1): bf16 detection, each bench's step in each
precision, and the rows a CPU without bf16 units gets. Nothing here is timed."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
sys.path.insert(0, str(SCRIPTS))
import _bench_common as mem  # noqa: E402
import _bench_models as models  # noqa: E402
import _bench_precision as precision  # noqa: E402
import _bench_sft_sides as sft_sides  # noqa: E402
import bench_all  # noqa: E402
import bench_dpo  # noqa: E402
import bench_lora  # noqa: E402
import bench_model  # noqa: E402
import bench_report  # noqa: E402
import bench_sft  # noqa: E402

from mistral_train import Mistral, MistralConfig  # noqa: E402

EPYC = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9R14
flags\t\t: fpu sse2 avx avx2 fma avx512f avx512bw avx512_bf16 avx512_vnni
processor\t: 1
model name\t: AMD EPYC 9R14
flags\t\t: fpu sse2 avx avx2 fma avx512f avx512bw avx512_bf16 avx512_vnni
"""
SAPPHIRE = "model name\t: Intel(R) Xeon(R) Platinum 8488C\nflags\t\t: avx2 avx512f amx_bf16 amx_tile amx_int8\n"
AVX2_ONLY = "model name\t: Intel(R) Xeon(R) CPU E5-2686 v4 @ 2.30GHz\nflags\t\t: fpu sse4_2 avx avx2 fma\n"
ARM = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes bf16 i8mm\nCPU implementer\t: 0x41\n"
_REAL_SUPPORT = mem.bf16_support  # kept before any test swaps it for a fake machine
# Smaller than the benches' QUICK_ARCH so each step takes well under a second (NF4: multiples of 64).
TINY = dict(vocab_size=512, hidden_size=128, intermediate_size=384, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, sliding_window=None, max_position_embeddings=256)


def test_detection_reads_the_cpu_name_and_its_bf16_flags_from_cpuinfo_text():
    epyc = mem.bf16_support(EPYC)
    assert epyc["cpu"] == "AMD EPYC 9R14" and epyc["bf16"] and epyc["units"] == ["avx512_bf16"]
    assert mem.bf16_text(epyc) == "bf16 units: yes (avx512_bf16)"
    amx = mem.bf16_support(SAPPHIRE)
    assert amx["bf16"] and amx["units"] == ["amx_bf16"]
    old = mem.bf16_support(AVX2_ONLY)
    assert old["cpu"].startswith("Intel(R) Xeon(R) CPU E5") and not old["bf16"] and old["simd"] == ["avx", "avx2"]
    assert mem.bf16_text(old) == "bf16 units: none (flags: avx avx2)"
    # ARM names bf16 differently ("bf16" in Features): not a flag we know to mean matmul units here
    arm = mem.bf16_support(ARM)
    assert arm["cpu"] == "unknown" and not arm["bf16"] and mem.bf16_text(arm) == "bf16 units: none (flags: no avx/amx)"


def test_every_bench_machine_line_names_the_bf16_verdict():
    info = {"bf16": mem.bf16_support(AVX2_ONLY)}
    assert mem.machine_bf16(info) == "bf16 units: none (flags: avx avx2)"
    assert mem.machine_bf16({}) == "bf16 units: unknown"  # a record from before the detection existed
    for script in ("bench_model.py", "bench_lora.py", "bench_dpo.py", "bench_sft.py"):
        assert "mem.machine_bf16(info)" in (SCRIPTS / script).read_text(), script


def test_a_cpu_without_bf16_units_gets_skipped_rows_that_say_why(monkeypatch):
    ran = []
    monkeypatch.setattr(mem, "bf16_support", lambda cpuinfo=None, device="cpu": _REAL_SUPPORT(AVX2_ONLY))
    monkeypatch.setattr(bench_all, "run_bench", lambda argv, device, quick: ran.append(argv) or {"error": "not run here"})
    monkeypatch.setattr(bench_all, "matmul_peak", lambda device, quick, dtype=None: {"gflops": 1.0, "n": 8, "dtype": "float32",
                                                                                     "repeats": 1})
    section = bench_all.section("cpu", ["model", "sft"], quick=True)
    skipped = "skipped: this CPU has no bf16 units (flags: avx avx2)"
    assert section["model-64-bf16"] == {"skipped": skipped} and section["model-64-bf16-autocast"] == {"skipped": skipped}
    assert section["sft-bf16"] == {"skipped": skipped} and "model-128-bf16" not in section
    assert all("--precision" not in argv for argv in ran) and len(ran) == 3  # model-64, model-128, sft: fp32 only
    assert "peaks_bf16" not in section
    lines = precision.table(section, bench_report.flops_per_token)
    assert lines[0] == "### bf16 on CPU (issue 18 item 1)"
    assert f"| model-64-bf16 | | | | | >= 1.2x | {skipped} | | |" in lines


def test_bench_all_runs_the_bf16_variants_where_the_cpu_has_bf16_units(monkeypatch):
    monkeypatch.setattr(mem, "bf16_support", lambda cpuinfo=None, device="cpu": _REAL_SUPPORT(EPYC))
    ran, peaks = [], []
    monkeypatch.setattr(bench_all, "run_bench", lambda argv, device, quick: ran.append(argv) or {"error": "not run here"})
    monkeypatch.setattr(bench_all, "matmul_peak", lambda device, quick, dtype=None: peaks.append(dtype) or {"gflops": 2.0})
    section = bench_all.section("cpu", ["lora"], quick=False)
    assert [argv[-1] for argv in ran] == ["bench_lora.py", "bf16-autocast", "bf16"]
    assert ran[2] == ["bench_lora.py", "--shapes", "512x4", "--precision", "bf16"]
    assert torch.bfloat16 in peaks and section["peak_gflops_bf16"] == 2.0 and len(section["peaks_bf16"]) == 4


def test_the_precision_table_divides_mfu_by_the_peak_of_the_dtype_used():
    arch = dict(TINY)
    side = lambda tps: {"tokens_per_s": tps, "grad_norms": [1.0], "moved": [True], "losses": [2.0]}  # noqa: E731
    run = lambda p, ours, theirs: {"bench": "model", "precision": p, "seq": 64, "batch": 1, "arch": arch,  # noqa: E731
                                   "train": {"ours": side(ours), "hf-sdpa": side(theirs)},
                                   "run": {"command": "python scripts/bench_model.py" + (f" --precision {p}" if p != "fp32" else "")}}
    section = {"peaks": [], "peak_gflops": 100.0, "peak_gflops_bf16": 400.0, "model-64": run("fp32", 130, 100),
               "model-64-bf16": run("bf16", 110, 100)}
    lines = precision.table(section, bench_report.flops_per_token)
    per_token = bench_report.flops_per_token(arch, 64)
    fp32_row = next(line for line in lines if "| fp32 |" in line)
    bf16_row = next(line for line in lines if "| bf16 |" in line)
    assert "1.30x | >= 1.2x | met" in fp32_row and f"{130 * per_token / 100e9:.0%} ({100 * per_token / 100e9:.0%})" in fp32_row
    assert "1.10x | >= 1.2x | **missed**" in bf16_row and f"{110 * per_token / 400e9:.0%}" in bf16_row
    assert fp32_row.endswith("| yes |")
    # the bf16 variant stays out of the issue-7 summary, which compares default-precision runs only
    assert [p["seq"] for p in bench_report.step_series(section)["full"]] == [64]


# ---- each bench's step, in each precision, on tiny sizes (in process: the child's handlers, called directly)


def _handlers(monkeypatch, serve_side) -> dict:
    captured: dict = {}
    monkeypatch.setattr(mem, "serve", lambda handlers: captured.update(handlers))
    serve_side()
    return captured


class _OutputDtypes:
    """The dtypes of every floating tensor a module returned while active (bf16 under autocast or bf16 weights)."""

    def __enter__(self):
        self.dtypes: set[torch.dtype] = set()

        def hook(module, args, out):
            if isinstance(out, torch.Tensor) and out.is_floating_point():
                self.dtypes.add(out.dtype)

        self.handle = torch.nn.modules.module.register_module_forward_hook(hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def _check_step(answer: dict, dtypes: set, p: str) -> None:
    assert answer["grad_norm"] > 0 and answer["moved"] is True
    assert (torch.bfloat16 in dtypes) == (p != "fp32"), dtypes  # the precision the step ran in


def _args(p: str, **kw) -> argparse.Namespace:
    return argparse.Namespace(device="cpu", precision=p, arch=TINY, **kw)



def _step_and_check(monkeypatch, serve, p) -> None:
    """One step of the bench side `serve` starts, checked: it trained, in precision `p`'s dtypes."""
    step = _handlers(monkeypatch, serve)["step"]
    with _OutputDtypes() as seen:
        answer = step()
    _check_step(answer, seen.dtypes, p)

@pytest.mark.parametrize("p", mem.PRECISIONS)
def test_model_bench_steps_in_each_precision(p, tmp_path, monkeypatch):
    weights = tmp_path / "w.safetensors"
    torch.manual_seed(0)
    save_file(Mistral(MistralConfig(**TINY)).state_dict(), str(weights))
    args = _args(p, seq=16, batch=2, new_tokens=2)
    for side in ("ours", "hf-sdpa"):
        _step_and_check(monkeypatch, lambda: bench_model.serve_side(side, weights, args), p)


@pytest.mark.parametrize("p", mem.PRECISIONS)
def test_lora_bench_steps_in_each_precision(p, tmp_path, monkeypatch):
    models.write_models(tmp_path, TINY)
    for kind in ("lora", "qlora"):
        for side in bench_lora.SIDES:
            _step_and_check(monkeypatch, lambda: bench_lora.serve_side(side, kind, 16, 2, tmp_path, _args(p)), p)


@pytest.mark.parametrize("p", mem.PRECISIONS)
def test_dpo_bench_steps_in_each_precision(p, tmp_path, monkeypatch):
    models.write_models(tmp_path, TINY)
    args = _args(p, seq=64, pairs=2, ckpt=False)  # make_pairs: pair k's rejected is seq / 2 - 16k long
    for side in bench_dpo.SIDES:
        _step_and_check(monkeypatch, lambda: bench_dpo.serve_side(side, "adapter_off", tmp_path, args), p)


@pytest.mark.parametrize("p", mem.PRECISIONS)
def test_sft_bench_epoch_in_each_precision(p, tmp_path, monkeypatch):
    arch = dict(sft_sides.ARCH, hidden_size=64, intermediate_size=192, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1)
    monkeypatch.setattr(sft_sides, "ARCH", arch)
    monkeypatch.setattr(bench_sft, "ARCH", arch)
    monkeypatch.setattr(sft_sides, "MAX_LEN", 128)
    monkeypatch.setattr(bench_sft, "MAX_LEN", 128)
    bench_sft.prepare(tmp_path, 4)
    for side in ("ours-packed", "trl-padded"):
        epoch = _handlers(monkeypatch, lambda: bench_sft.serve_side(side, tmp_path, "cpu", p))["epoch"]
        with _OutputDtypes() as seen:
            answer = epoch()
        assert answer["grad_norms"] and all(n > 0 for n in answer["grad_norms"]), answer
        assert (torch.bfloat16 in seen.dtypes) == (p != "fp32"), seen.dtypes


def test_quick_model_bench_reports_the_precision_it_ran_in_and_that_it_trained():
    done = subprocess.run([sys.executable, str(SCRIPTS / "bench_model.py"), "--quick", "--no-decode", "--no-eager",
                           "--seq", "16", "--precision", "bf16"], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    payload = json.loads(next(line for line in done.stdout.splitlines() if line.startswith(mem.JSON_PREFIX))
                         [len(mem.JSON_PREFIX):])
    assert payload["precision"] == "bf16"
    assert "precision bf16: pure bf16 weights on both sides" in done.stdout and "bf16 units:" in done.stdout
    for side in ("ours", "hf-sdpa"):
        assert payload["train"][side]["grad_norms"][0] > 0 and payload["train"][side]["moved"] == [True]


def test_quick_dpo_bench_profiles_both_sides():
    # the profile behind a DPO verdict: each side's op time, its matmul share and its costliest ops
    done = subprocess.run([sys.executable, str(SCRIPTS / "bench_dpo.py"), "--quick", "--references", "copy"],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    payload = json.loads(next(line for line in done.stdout.splitlines() if line.startswith(mem.JSON_PREFIX))
                         [len(mem.JSON_PREFIX):])
    for side in bench_dpo.SIDES:
        profile = payload["rows"][0][side]["profile"]
        assert 0 < profile["matmul_ms"] < profile["op_ms"] and profile["top_ops"], profile
    assert "- Profile, copy/off" in done.stdout
