"""The layering of the package, read from its source: a module imports (at any level, inside
functions included) only from its own layer or the layers below it. Bottom up:

 1 leaf math and utilities: scheme, quant, hadamard, errors, fields, files, memory, progress, version,
   pausable
 2 arch            3 runtime (modules only)     4 transforms        5 algorithms
 6 pipeline        7 the public API: api, recipes
 8 io, evaluation, analysis, qat, data, models    9 jobs, report    10 cli
The package's __init__ re-exports the public names and sits above everything."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "lowbit"

LAYERS = {
    "scheme": 1,
    "quant": 1,
    "hadamard": 1,
    "errors": 1,
    "fields": 1,
    "files": 1,
    "memory": 1,
    "version": 1,
    "progress": 1,
    "pausable": 1,
    "activations": 1,
    "distributed": 1,
    "arch": 2,
    "onload": 2,
    "runtime": 3,
    "transforms": 4,
    "algorithms": 5,
    "pipeline": 6,
    "api": 7,
    "recipes": 7,
    "io": 8,
    "evaluation": 8,
    "analysis": 8,
    "qat": 8,
    "data": 8,
    "models": 8,
    "streaming": 8,
    "jobs": 9,
    "report": 9,
    "cli": 10,
    "__init__": 11,
}
FORBIDDEN_BELOW = {"scheme", "quant", "runtime"}  # never import these, whatever the layer numbers say
FORBIDDEN = {"pipeline", "io", "jobs", "cli", "analysis", "qat"}


def top_name(module: str) -> str:
    """The first component under lowbit (lowbit.runtime.linear -> runtime; lowbit -> __init__)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every lowbit import in the file, relative ones resolved."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "lowbit"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "lowbit":
                continue
            if node.module is None or target.count(".") == 0:  # `from . import x`: x is a module of that package
                found += [(node.lineno, f"{target}.{a.name}") for a in node.names]
            else:
                found.append((node.lineno, target))
    return found


SOURCES = sorted(SRC.rglob("*.py"))


def test_every_module_has_a_layer():
    assert SOURCES
    for path in SOURCES:
        assert top_name(module_name(path)) in LAYERS, f"{path} is in no layer of {sorted(LAYERS)}"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(SRC)))
def test_imports_go_down_the_layers(path):
    importer = top_name(module_name(path))
    for line, target in imports_of(path):
        imported = top_name(target)
        where = f"{path.relative_to(SRC)}:{line} imports {target}"
        assert LAYERS[imported] <= LAYERS[importer], f"{where}: layer {LAYERS[imported]} above layer {LAYERS[importer]}"
        if importer in FORBIDDEN_BELOW:
            assert imported not in FORBIDDEN, where


def test_the_checker_sees_imports_inside_functions(tmp_path):
    """The rule holds for deferred imports too: the parser finds them wherever they are."""
    path = SRC / "runtime" / "linear.py"
    assert "lowbit.quant.qweight" in {t for _, t in imports_of(path)}
    fake = SRC / "runtime" / "_probe_for_test.py"
    try:
        fake.write_text("def f():\n    from ..pipeline import quantize_sequential\n    from .. import jobs\n")
        assert {t for _, t in imports_of(fake)} == {"lowbit.pipeline", "lowbit.jobs"}
    finally:
        fake.unlink()
