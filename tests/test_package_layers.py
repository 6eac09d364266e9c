"""The package is layered: a module imports only from its own layer and the layers below it."""

import ast
from pathlib import Path

import slicegpt

PACKAGE = Path(slicegpt.__file__).parent
# Bottom to top. A module's layer is its subpackage, or its own name at the top level.
LAYERS = [
    {"errors", "checks", "config", "tasks"},
    {"architectures"},
    {"method"},
    {"sizing"},
    {"io"},
    {"validation"},
    {"evaluation"},
    {"running"},
    {"recovery"},
    {"jobs"},
    {"commands", "cli", "__init__", "vllm_plugin"},
]


def layer_of(module: str) -> int:
    head = module.split(".")[1] if module.count(".") else "__init__"
    return next(i for i, names in enumerate(LAYERS) if head in names)


def imports_of(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("slicegpt"):
            found.append(node.module if node.module != "slicegpt" else f"slicegpt.{node.names[0].name}")
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.startswith("slicegpt.")]
    return found


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(("slicegpt", *parts))


def test_no_module_imports_a_layer_above_its_own():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = module_name(path)
        for target in imports_of(path):
            if layer_of(target) > layer_of(name):
                upward.append(f"{name} imports {target}")
    assert not upward, "\n".join(upward)


def test_slicing_and_recovery_import_nothing_from_each_other():
    """running/ slices and recovery/ trains a slice: two rooms side by side, though the list puts one above the other."""
    crossing = []
    for room, other in (("running", "recovery"), ("recovery", "running")):
        for path in sorted((PACKAGE / room).rglob("*.py")):
            crossing += [f"{module_name(path)} imports {target}" for target in imports_of(path)
                         if target.split(".")[1] == other]
    assert not crossing, "\n".join(crossing)


def test_no_relative_imports_hide_the_layers():
    relative = [str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
                if any(isinstance(n, ast.ImportFrom) and n.level for n in ast.walk(ast.parse(p.read_text())))]
    assert not relative


def test_the_remote_code_file_imports_nothing_from_slicegpt():
    assert not imports_of(PACKAGE / "architectures" / "modeling_sliced.py")
