import ast
from pathlib import Path

import pytest

MATH = ["schedule", "parameterization", "solvers", "guidance", "consistency", "ema", "constants", "adversarial",
        "objectives", "trajectory", "lightning"]
ROOT = Path(__file__).resolve().parents[1] / "lcm"


@pytest.mark.parametrize("name", MATH)
def test_math_modules_import_only_torch(name):
    tree = ast.parse((ROOT / f"{name}.py").read_text())
    allowed = {"torch", "math", "typing", "dataclasses", "contextlib", "__future__"}  # torch and the stdlib only
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots = {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative imports must stay inside the math modules
                assert (node.module or "").split(".")[0] in MATH, f"{name} imports .{node.module}"
                continue
            roots = {node.module.split(".")[0]}
        else:
            continue
        assert roots <= allowed, f"{name}.py imports {roots - allowed}"


def test_seeds_module_imports_only_torch_numpy_and_the_standard_library():
    # lcm/seeds.py is a leaf: every module may import it, so it imports nothing of lcm and nothing torch does not bring (numpy).
    tree = ast.parse((ROOT / "seeds.py").read_text())
    allowed = {"torch", "numpy", "hashlib", "typing", "__future__"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots = {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert not node.level, f"seeds.py imports .{node.module}"
            roots = {node.module.split(".")[0]}
        else:
            continue
        assert roots <= allowed, f"seeds.py imports {roots - allowed}"


def _lcm_import_graph() -> dict[str, set[str]]:
    """lcm module → the lcm modules it imports anywhere in its file (function-level imports included)."""
    modules = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                edges |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                edges |= {base} | {f"{base}.{a.name}" for a in node.names}
        graph[name] = {e for e in edges if e in modules and e != name}
    return graph


def test_no_import_cycles_in_lcm():
    # A cycle makes import order matter and forces function-level imports; lcm/seeds.py exists partly to break one.
    graph, state, cycles = _lcm_import_graph(), {}, []

    def visit(node, trail):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(trail[trail.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, f"import cycles: {cycles}"
