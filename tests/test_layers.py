"""The package's layers point one way (STYLE.md 17): base helpers <- the config schema <- model, schedule, data <-
train <- the commands. Imports inside functions count: an arrow is an arrow wherever it is written."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "gl_ray"

LAYERS = {  # module (or package prefix) -> layer; a module may import its own layer or lower ones
    "gl_ray": 0, "gl_ray.errors": 0, "gl_ray.sizes": 0, "gl_ray.storage": 0, "gl_ray.plots": 0, "gl_ray.lock": 0,
    "gl_ray.shipped": 0,
    "gl_ray.config": 1,
    "gl_ray.model": 2, "gl_ray.architectures": 2,
    "gl_ray.attention": 2, "gl_ray.schedule": 2, "gl_ray.devices": 2, "gl_ray.ray_utils": 2,
    "gl_ray.context": 2, "gl_ray.data": 2,
    "gl_ray.train": 3,
    "gl_ray.evaluate": 4, "gl_ray.bench": 4, "gl_ray.report": 4, "gl_ray.reproduce": 4, "gl_ray.tune": 4,
    "gl_ray.status": 4, "gl_ray.cli": 5, "gl_ray.__main__": 5,
}


def module_files() -> dict[str, Path]:
    return {".".join(f.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): f
            for f in PACKAGE.rglob("*.py")}


def imports(modules: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the package's modules it imports anywhere in its file (top level or inside functions)."""
    edges = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                targets |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
            elif isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
        edges[name] = {t for t in targets if t in modules and t != name}
    return edges


def layer_of(module: str) -> int:
    """The layer of a module: its own entry, else its package's (gl_ray.train.loop -> gl_ray.train)."""
    parts = module.split(".")
    for k in range(len(parts), 0, -1):
        if ".".join(parts[:k]) in LAYERS:
            return LAYERS[".".join(parts[:k])]
    raise AssertionError(f"{module} has no layer: add it to LAYERS in tests/test_layers.py")


def find_cycle(edges: dict[str, set[str]]) -> list[str]:
    """One import cycle as [a, b, ..., a], or [] (depth-first search; grey = on the current path)."""
    state: dict[str, str] = {}

    def visit(u: str, path: list[str]) -> list[str]:
        state[u] = "grey"
        for v in sorted(edges[u]):
            if state.get(v) == "grey":
                return path[path.index(v):] + [v]
            if v not in state and (cycle := visit(v, path + [v])):
                return cycle
        state[u] = "black"
        return []

    for m in sorted(edges):
        if m not in state and (cycle := visit(m, [m])):
            return cycle
    return []


def test_no_import_cycle():
    assert find_cycle(imports(module_files())) == []


def test_no_module_imports_a_higher_layer():
    edges = imports(module_files())
    upward = [f"{m} -> {t}" for m, ts in edges.items() for t in sorted(ts) if layer_of(t) > layer_of(m)]
    assert upward == []


def test_the_checks_can_fail():
    """The cycle finder and the layer rule catch what they are for, on made-up graphs."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    assert layer_of("gl_ray.train.loop") == 3 > layer_of("gl_ray.config")


def test_the_config_schema_imports_nothing_of_the_training_side():
    edges = imports(module_files())
    assert edges["gl_ray.config"] <= {"gl_ray.errors", "gl_ray.sizes", "gl_ray.shipped"}


def test_no_function_is_over_60_lines():
    """Functions a reader can hold (STYLE.md 11): split by concern, as config.validate and plan_stages were."""
    long = [f"{name}.{node.name}: {node.end_lineno - node.lineno + 1} lines"
            for name, path in module_files().items() for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60]
    assert long == []
