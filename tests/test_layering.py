"""The import graph of fastft: no loop, no upward arrow, no function-level import of fastft code.

The rules (also in docs/architecture.md). Each module of ``fastft/`` and ``kernels/`` (installed as
``fastft.kernels``) belongs to one layer; a module imports only from its own layer or a lower one, and
the graph has no cycle, not even through imports inside functions. The lower the layer, the less it knows:

    0 math         fastft.math                   pure math: Hadamard factorizations, quantization grids
    1 base         config, report, distributed, build, measure, process_memory, node_costs, _version
    2 bindings     fastft._ext, fastft.kernels   C/CUDA libraries through ctypes; Triton kernels
    3 dispatch     fastft.dispatch               the one place a backend is chosen
    4 ops          fastft.ops                    one torch.library op per file
    5 model        fastft.bnb, fastft.targets    recognising a model's layers (4-bit, target names)
    6 nn           fastft.nn                     drop-in modules (the FastFTLayer protocol)
    7 plans        fastft.plans, fastft.policies what a method does to a whole model; trainable selection
    8 patch        fastft.patch                  plan, check, apply with rollback, report
    9 io           io, peft_compat, quantized, merging, sparse_delta_io, integrations
   10 top          fastft (the package), fastft.demo, fastft.examples

The only imports of fastft code inside functions: the Triton backends, registered with
``fastft.dispatch.lazy("fastft.kernels.<op>", ...)`` (checked here as arrows from the op file), and the
names in ``LAZY_ALLOWED`` with the optional dependency each keeps optional.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

LAYERS = [
    ("math", ["fastft.math"]),
    ("base", ["fastft._version", "fastft.config", "fastft.report", "fastft.distributed", "fastft.build",
              "fastft.measure", "fastft.process_memory", "fastft.node_costs"]),
    ("bindings", ["fastft._ext", "fastft.kernels"]),
    ("dispatch", ["fastft.dispatch"]),
    ("ops", ["fastft.ops"]),
    ("model", ["fastft.bnb", "fastft.targets"]),
    ("nn", ["fastft.nn"]),
    ("plans", ["fastft.plans", "fastft.policies"]),
    ("patch", ["fastft.patch"]),
    ("io", ["fastft.io", "fastft.peft_compat", "fastft.quantized", "fastft.merging", "fastft.sparse_delta_io",
            "fastft.integrations"]),
    ("top", ["fastft", "fastft.demo", "fastft.examples"]),
]

# (importer, imported): why the import sits inside a function
LAZY_ALLOWED = {
    ("fastft.integrations", "fastft.integrations.trl"): "trl is optional: FastFTSFTTrainer subclasses trl.SFTTrainer",
}


def _modules() -> dict[str, Path]:
    found = {}
    for folder, package in (("fastft", "fastft"), ("kernels", "fastft.kernels")):
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = [package, *path.relative_to(ROOT / folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    if "fastft.kernels" not in found:  # kernels/ as a namespace portion: no __init__.py
        found["fastft.kernels"] = ROOT / "kernels"
    return found


MODULES = _modules()


def _known(name: str) -> str | None:
    if name.startswith("kernels."):
        name = "fastft." + name
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _targets(module: str, node: ast.AST, is_package: bool) -> list[str]:
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        if node.level:
            base = module.split(".")[: None if is_package else -1]
            base = base[: len(base) - (node.level - 1)]
            prefix = ".".join(base + ([node.module] if node.module else []))
        else:
            prefix = node.module or ""
        names = [f"{prefix}.{alias.name}" if f"{prefix}.{alias.name}" in MODULES else prefix for alias in node.names]
    return [t for t in (_known(n) for n in names if n.split(".")[0] in ("fastft", "kernels")) if t]


def _graph() -> tuple[dict[str, set[str]], list[tuple[str, str, int]]]:
    """(module -> the fastft modules it imports, [(module, imported, line) of imports inside functions])."""
    edges: dict[str, set[str]] = {m: set() for m in MODULES}
    inside: list[tuple[str, str, int]] = []
    for module, path in MODULES.items():
        if path.is_dir():
            continue
        tree = ast.parse(path.read_text(), str(path))

        def walk(node: ast.AST, in_function: bool) -> None:
            for child in ast.iter_child_nodes(node):
                nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
                if isinstance(child, (ast.Import, ast.ImportFrom)):
                    for target in _targets(module, child, path.name == "__init__.py"):
                        if target != module:
                            edges[module].add(target)
                            if nested:
                                inside.append((module, target, child.lineno))
                elif (isinstance(child, ast.Call) and getattr(child.func, "id", getattr(child.func, "attr", None)) == "lazy"
                      and child.args and isinstance(child.args[0], ast.Constant)):
                    target = _known(child.args[0].value)  # a backend registered with fastft.dispatch.lazy
                    assert target == child.args[0].value, f"{module}: lazy({child.args[0].value!r}) names no module"
                    edges[module].add(target)
                walk(child, nested)

        walk(tree, False)
    return edges, inside


def _layer(module: str) -> int:
    best, index = "", None
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > len(best):
                best, index = prefix, i
    assert index is not None, f"{module} belongs to no layer: add it to LAYERS here and in docs/architecture.md"
    return index


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
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
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_the_scan_sees_the_package():
    for expected in ("fastft.patch", "fastft.ops.lora", "fastft.kernels.lora", "fastft.kernels.common",
                     "fastft.plans.registry", "fastft.math.hadamard", "fastft.dispatch"):
        assert expected in MODULES
    edges, _ = _graph()
    assert "fastft.kernels.lora" in edges["fastft.ops.lora"]  # the lazy Triton backend counts as an arrow
    assert "fastft.plans.registry" in edges["fastft.plans.lora"]


def test_every_module_has_a_layer():
    for module in MODULES:
        _layer(module)


def test_no_import_loop():
    edges, _ = _graph()
    assert _cycles(edges) == []


def test_no_upward_arrow():
    edges, _ = _graph()
    upward = [
        f"{module} ({LAYERS[_layer(module)][0]}) imports {target} ({LAYERS[_layer(target)][0]})"
        for module, targets in sorted(edges.items()) for target in sorted(targets)
        if _layer(target) > _layer(module)
    ]
    assert upward == []


def test_no_function_level_import_of_fastft_code():
    _, inside = _graph()
    unexplained = [f"{module}:{line} imports {target}" for module, target, line in inside
                   if (module, target) not in LAZY_ALLOWED]
    assert unexplained == []


def test_math_imports_nothing_of_fastft_but_itself():
    edges, _ = _graph()
    for module, targets in edges.items():
        if _layer(module) == 0:
            assert all(_layer(t) == 0 for t in targets), (module, targets)
