"""Put the GPU section that scripts/gpu_check.sh measured into docs/benchmarks.md and docs/benchmarks.json.

`bench_all.py --gpu-only --out DIR` writes a whole report of its own (its CPU section says "not run"). This
takes that report's "## GPU (CUDA)" section, as bench_report.device_section renders it, and puts it in place of
the docs' section of the same title, headed by the GPU's name, the command, the date and the versions; every
other section of the docs stays as it is (the CPU figures come from another machine and another run). The
cuda entry of DIR/benchmarks.json replaces the docs JSON's, with the run's record beside it as "gpu_run", and
the GPU plots are copied to docs/img/.

    python scripts/gpu_section.py --measured outputs/gpu-check [--docs docs] [--note "a line"]...
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench_common as mem  # noqa: E402
import bench_report  # noqa: E402

TITLE = "## GPU (CUDA)"


def section_bounds(lines: list[str], title: str = TITLE) -> tuple[int, int]:
    """[start, end) of the section headed `title`: up to the next "## " heading or the end."""
    if lines.count(title) != 1:
        raise SystemExit(f"gpu_section: expected one '{title}' heading in the report, found {lines.count(title)}")
    start = lines.index(title)
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    return start, end


def header(run: dict, notes: list[str]) -> list[str]:
    """Who measured the section: the GPU by torch.cuda.get_device_name, the command, date and versions."""
    info = run["machine"]
    return [f"Measured by `scripts/gpu_check.sh` on **{info['gpu']}** (host CPU {info['cpu']}, {info['cores']} "
            f"cores), {run['date']}: `{run['command']}` ({run['wall_s'] / 60:.1f} min); Python {info['python']}, "
            f"{mem.versions_text(info)}.", *(f"- {note}" for note in notes), ""]


def spliced(doc: str, section: list[str]) -> str:
    """`doc` with its GPU section replaced by `section` (which starts with the same heading)."""
    lines = doc.rstrip("\n").split("\n")
    start, end = section_bounds(lines)
    tail = lines[end:]
    return "\n".join(lines[:start] + section + ([""] if tail and section[-1] != "" else []) + tail).rstrip() + "\n"


def gpu_section(measured: dict, notes: list[str], images: list[Path], out: Path) -> list[str]:
    cuda = measured["cuda"]
    body = bench_report.device_section(TITLE.removeprefix("## "), cuda, images, out)
    return [body[0], "", *header(measured["run"], notes), *body[2:]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--measured", type=Path, required=True, help="the --out folder of bench_all.py --gpu-only")
    parser.add_argument("--docs", type=Path, default=Path(__file__).resolve().parent.parent / "docs")
    parser.add_argument("--note", action="append", default=[], help="a line under the header (repeatable)")
    args = parser.parse_args()
    measured_json = args.measured / "benchmarks.json"
    if not measured_json.is_file():
        raise SystemExit(f"gpu_section: {measured_json} does not exist; run bench_all.py --gpu-only --out {args.measured}")
    measured = json.loads(measured_json.read_text())
    if "not_run" in measured["cuda"]:
        raise SystemExit(f"gpu_section: {measured_json} has no GPU figures: {measured['cuda']['not_run']}")
    images = []
    for png in sorted((args.measured / "img").glob("*.png")):
        if "cuda" in png.stem:  # bench_report names each device's plots after it
            images.append(Path(shutil.copy2(png, args.docs / "img" / png.name)))
    md, js = args.docs / "benchmarks.md", args.docs / "benchmarks.json"
    md.write_text(spliced(md.read_text(), gpu_section(measured, args.note, images, args.docs)))
    docs = json.loads(js.read_text())
    docs["cuda"], docs["gpu_run"] = measured["cuda"], measured["run"]
    js.write_text(json.dumps(docs, indent=1) + "\n")
    print(f"[gpu_section] wrote the GPU section of {md} and {js} ({len(images)} plots)", file=sys.stderr)


if __name__ == "__main__":
    main()
