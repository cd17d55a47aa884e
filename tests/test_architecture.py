"""The package's layering, read from the source with ast: no import cycle between modules, and no import
from a lower layer to a higher one (docs/architecture.md draws these layers).

Every import counts: at module level, inside functions and under `if TYPE_CHECKING:`, because each one
is a module knowing another. A failure names each offending import as `file:line  importer -> imported`
with the two layers, so the message says what to move.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path
from typing import NamedTuple

PACKAGE = Path(__file__).resolve().parents[1] / "mistral_train"

# Top first. A module may import modules of its own layer and of any layer below it. Names are the
# package's top-level modules and subpackages; everything inside a subpackage shares its layer.
LAYERS: list[tuple[str, ...]] = [
    ("__main__", "cli"),
    ("train", "plan", "plan_vision", "plan_moe"),
    ("dist", "tracking"),
    ("config", "config_checks"),
    ("generate", "chat", "rollout", "folders"),
    ("data",),
    ("model",),
    # Below model/: LoRA and NF4 work on any module by name and import no model code, while the model's
    # from_pretrained(quantize="nf4") reads NF4 weights through quant/.
    ("adapters", "quant"),
    ("losses", "checkpoint"),
    ("tokenizer",),
    ("errors", "jsonfile", "wording"),
]
# mistral_train/__init__.py re-exports the public model classes (`from mistral_train import Mistral`):
# it sits half a layer above model/, so nothing in model/ or below may import the package root by name.
ROOT_LAYER_OF = "model"


class Import(NamedTuple):
    source: str  # importing module, dotted
    target: str  # imported module, dotted
    file: str  # path relative to the repository
    line: int


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _resolve(module: str, path: Path, node: ast.ImportFrom) -> str:
    """The absolute module a `from X import ...` names (relative imports resolved against `module`)."""
    if not node.level:
        return node.module or ""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = package[: len(package) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def imports() -> list[Import]:
    """Every import of a mistral_train module by another one: `from a.b import c` points at module a.b.c
    when c is a module, else at a.b."""
    modules = _modules()
    found = []
    for module, path in modules.items():
        file = str(path.relative_to(PACKAGE.parent))
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), file)):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(module, path, node)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for target in targets:
                if target in modules and target != module:
                    found.append(Import(module, target, file, node.lineno))
    return sorted(set(found), key=lambda i: (i.file, i.line, i.target))


def layer_of(module: str) -> float:
    """The index of `module`'s layer in LAYERS (0 is the top)."""
    parts = module.split(".")
    unit = parts[1] if len(parts) > 1 else ROOT_LAYER_OF
    for index, names in enumerate(LAYERS):
        if unit in names:
            return index - 0.5 if len(parts) == 1 else index
    raise AssertionError(f"mistral_train/{unit}: in no layer of tests/test_architecture.py::LAYERS; add it there "
                         "and to docs/architecture.md")


def _layer_name(module: str) -> str:
    return "package root" if module == "mistral_train" else "/".join(LAYERS[int(layer_of(module))])


def upward_imports(found: list[Import]) -> list[str]:
    """`file:line  a -> b  (layer of a -> higher layer of b)` for each import that points upwards."""
    return [f"{i.file}:{i.line}  {i.source} -> {i.target}  ({_layer_name(i.source)} -> {_layer_name(i.target)})"
            for i in found if layer_of(i.target) < layer_of(i.source)]


def cycles(found: list[Import]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    graph: dict[str, set[str]] = defaultdict(set)
    for i in found:
        graph[i.source].add(i.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out = []

    def visit(v: str) -> None:  # recursion depth is at most the number of modules (~150)
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(_modules()):
        if v not in index:
            visit(v)
    return out


def test_the_import_reader_sees_imports_inside_functions_and_from_packages():
    found = {(i.source, i.target) for i in imports()}
    # cli.py imports the loop inside the function that runs it; the package root re-exports the model
    assert ("mistral_train.cli", "mistral_train.train.loop") in found
    assert ("mistral_train", "mistral_train.model.mistral") in found
    assert ("mistral_train.__main__", "mistral_train.cli") in found
    # the checks are not vacuous: an upward edge and a two-module cycle are reported, with file and line
    fake = [Import("mistral_train.errors", "mistral_train.cli", "mistral_train/errors.py", 3),
            Import("mistral_train.cli", "mistral_train.errors", "mistral_train/cli.py", 9)]
    assert upward_imports(fake) == ["mistral_train/errors.py:3  mistral_train.errors -> mistral_train.cli  "
                                    "(errors/jsonfile/wording -> __main__/cli)"]
    assert cycles(fake) == [["mistral_train.cli", "mistral_train.errors"]]


def test_every_module_has_a_layer():
    for module in _modules():
        layer_of(module)  # raises naming the module that no layer lists


def test_no_import_points_to_a_higher_layer():
    bad = upward_imports(imports())
    assert not bad, f"{len(bad)} import(s) point upwards (tests/test_architecture.py::LAYERS):\n" + "\n".join(bad)


def test_no_import_cycle_between_modules():
    found = imports()
    report = []
    for component in cycles(found):
        members = set(component)
        edges = [f"    {i.file}:{i.line}  {i.source} -> {i.target}" for i in found
                 if i.source in members and i.target in members]
        report.append(f"cycle of {len(component)} modules:\n" + "\n".join(edges))
    assert not report, "\n".join(report)
