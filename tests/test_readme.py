"""The README's Python example names what the package really has (its imports and attributes)."""

import ast
import importlib
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_every_import_in_the_readme_resolves():
    blocks = _python_blocks()
    assert blocks
    for block in blocks:
        for node in ast.walk(ast.parse(block)):
            if isinstance(node, ast.ImportFrom) and node.module.startswith("slicegpt"):
                module = importlib.import_module(node.module)
                for alias in node.names:
                    assert hasattr(module, alias.name), f"{node.module}.{alias.name}"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("slicegpt"):
                        importlib.import_module(alias.name)


def test_every_slicegpt_attribute_in_the_readme_exists():
    import slicegpt

    for block in _python_blocks():
        for node in ast.walk(ast.parse(block)):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "slicegpt":
                assert hasattr(slicegpt, node.attr), f"slicegpt.{node.attr}"
