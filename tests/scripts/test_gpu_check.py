"""scripts/gpu_check.sh and what it stands on, checked on CPU (the GPU run itself needs a CUDA machine):
the scripts parse, --dry-run prints the offline steps in order, the carried wheel list covers pyproject.toml
and every need of those wheels (read from this venv's installed metadata, the same versions), the 1b bench
size is a ~1B Mistral, the GPU section splices into docs/benchmarks.md leaving every other line, and tests/cuda
imports and collects here while the normal suite does not collect it."""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from mistral_train import Mistral, MistralConfig

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
import gpu_section  # noqa: E402

# The GPU image's interpreter: wheel markers are evaluated for it, not for this venv's Python.
GPU_PYTHON = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
              "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
              "platform_python_implementation": "CPython", "os_name": "posix", "extra": ""}
# pyproject dependencies the GPU run does not need, and why (anything else must be carried or in the image)
NOT_ON_GPU = {"deepspeed": "tests/oracle's ZeRO estimators and bench_dist (CPU only); neither runs in gpu_check",
              "pytest-xdist": "gpu_check runs pytest in one process"}


def run(*argv: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120, **kwargs)


def pinned() -> dict[str, str]:
    out = run("scripts/gpu_wheels.sh", "--list")
    assert out.returncode == 0, out.stderr
    pairs = [line.split("==") for line in out.stdout.split()]
    assert all(len(p) == 2 for p in pairs), f"every wheel is pinned name==version: {out.stdout}"
    names = [canonicalize_name(n) for n, _ in pairs]
    assert len(names) == len(set(names)), "one version of each wheel (two stop pip's install)"
    return {canonicalize_name(n): v for n, v in pairs}


def image() -> set[str]:
    out = run("scripts/gpu_wheels.sh", "--image")
    assert out.returncode == 0, out.stderr
    return {canonicalize_name(n) for n in out.stdout.split()}


@pytest.mark.parametrize("script", ["scripts/gpu_check.sh", "scripts/gpu_wheels.sh"])
def test_scripts_parse(script: str) -> None:
    done = run("bash", "-n", script)
    assert done.returncode == 0, done.stderr


def test_dry_run_prints_the_offline_steps_in_order() -> None:
    done = run("scripts/gpu_check.sh", "--dry-run")
    assert done.returncode == 0, done.stderr
    steps = [line[2:] for line in done.stderr.splitlines() if line.startswith("+ ")]
    install, imports, tests, *benches, section = steps
    assert "pip install" in install and "--no-index" in install and "--find-links .whl" in install
    assert all(f"{name}=={version}" in install for name, version in pinned().items())
    assert "download" not in done.stderr  # never a registry on the GPU machine
    assert "import mistral_train, trl" in imports
    assert tests.split()[1:3] == ["-m", "pytest"] and tests.split()[-3] == "tests/cuda"
    assert [b.split("--only ")[1].split()[0] for b in benches] == ["model", "lora", "dpo", "sft"]
    assert all("scripts/bench_all.py --gpu-only --size 1b" in b and b.startswith("timeout ") for b in benches)
    assert "--merge" not in benches[0] and all("--merge" in b for b in benches[1:])
    assert section.split()[1] == "scripts/gpu_section.py"


def test_unknown_argument_is_one_line() -> None:
    done = run("scripts/gpu_check.sh", "--fast")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "gpu_check: unknown argument '--fast'; expected --dry-run, --no-bench or --copy-to DIR"]


def test_without_cuda_it_says_so_and_exits_2() -> None:
    # no GPU visible even on a machine that has one, so the check stops at its first step
    done = run("scripts/gpu_check.sh", env={**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 2
    assert "no CUDA GPU" in done.stderr and "run this on a CUDA machine" in done.stderr


def test_wheels_cover_pyproject_and_match_this_venv() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wheels, in_image = pinned(), image()
    assert not set(wheels) & in_image, "a wheel carried for a package the image already has"
    for line in project["dependencies"] + project["optional-dependencies"]["dev"]:
        req = Requirement(line)
        name = canonicalize_name(req.name)
        if name in NOT_ON_GPU:
            continue
        assert name in wheels or name in in_image, f"pyproject.toml needs {req}: neither carried nor in the image"
        if name in wheels:
            assert req.specifier.contains(wheels[name], prereleases=True), f"{name}=={wheels[name]} breaks {req}"
    for name, version in wheels.items():  # the GPU runs what this venv tests
        assert md.version(name) == version, f"{name}: carried {version}, this venv has {md.version(name)}"


def test_every_need_of_a_carried_wheel_is_carried_or_in_the_image() -> None:
    wheels, available = pinned(), pinned().keys() | image()
    for name in wheels:
        for line in md.requires(name) or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate(GPU_PYTHON):
                assert canonicalize_name(req.name) in available, f"{name} needs {req}: carry it (scripts/gpu_wheels.sh)"


def test_size_1b_is_a_billion_parameter_mistral(monkeypatch: pytest.MonkeyPatch) -> None:
    """bench_all --size 1b sets BENCH_SIZE=1b for its benches; _bench_common.ARCH, read fresh under it."""
    monkeypatch.setenv("BENCH_SIZE", "1b")
    spec = importlib.util.spec_from_file_location("_bench_common_1b", ROOT / "scripts" / "_bench_common.py")
    common = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(common)
    arch = common.ARCH
    assert (arch["hidden_size"], arch["num_hidden_layers"], arch["intermediate_size"], arch["vocab_size"]) == (2048, 16, 5632, 32000)
    with torch.device("meta"):
        n = sum(p.numel() for p in Mistral(MistralConfig(**arch)).parameters())
    # hand count: 16 x (q, o 2048^2; k, v 2048 x 512; 3 MLP 2048 x 5632; 2 norms) + embed and head + final norm
    assert n == 16 * (2 * 2048**2 + 2 * 2048 * 512 + 3 * 2048 * 5632 + 2 * 2048) + 2 * 32000 * 2048 + 2048
    assert 0.8e9 < n < 1.1e9


def test_gpu_section_replaces_only_that_section_of_the_docs() -> None:
    doc = (ROOT / "docs" / "benchmarks.md").read_text()
    run_record = {"machine": {"gpu": "NVIDIA H100 80GB HBM3", "cpu": "Some CPU", "cores": 16, "python": "3.12.3",
                              "versions": {"torch": "2.11.0+cu130"}},
                  "date": "2026-12-07 05:00 UTC", "command": "scripts/bench_all.py --gpu-only --size 1b", "wall_s": 300}
    section = ["## GPU (CUDA)", "", *gpu_section.header(run_record, ["a note"]), "the figures"]
    new = gpu_section.spliced(doc, section)
    old_lines, new_lines = doc.splitlines(), new.splitlines()
    start, end = gpu_section.section_bounds(old_lines)
    new_start, new_end = gpu_section.section_bounds(new_lines)
    assert new_lines[:start] == old_lines[:start] and new_lines[new_end:] == old_lines[end:]
    assert new_lines[new_start:new_end] == section + [""]
    assert "on **NVIDIA H100 80GB HBM3**" in section[2] and "torch 2.11.0+cu130" in section[2]
    assert section[3] == "- a note"


def test_cuda_tests_import_and_collect_here_but_not_in_the_normal_suite() -> None:
    pytest_cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "--collect-only"]
    named = run(*pytest_cmd, "tests/cuda")
    assert named.returncode == 0, named.stdout[-2000:]
    collected = [line for line in named.stdout.splitlines() if line.startswith("tests/cuda/")]
    files = {line.split("::")[0] for line in collected}
    assert files == {f"tests/cuda/{p.name}" for p in (ROOT / "tests" / "cuda").glob("test_*.py")} and len(files) == 4
    # the whole tests/ folder with every entry but cuda/ ignored: what is left to collect is tests/cuda, and the
    # suite's collect_ignore keeps it out
    others = [f"--ignore=tests/{p.name}" for p in (ROOT / "tests").iterdir() if p.name not in ("cuda", "conftest.py")]
    suite = run(*pytest_cmd, *others, "tests")
    assert "tests/cuda" not in suite.stdout and "no tests collected" in suite.stdout, suite.stdout[-2000:]
