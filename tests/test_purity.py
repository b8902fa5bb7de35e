import ast
from pathlib import Path

import pytest

MATH = ["schedule", "parameterization", "solvers", "guidance", "consistency", "ema", "constants"]
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
