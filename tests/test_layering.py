"""The layering rule, checked on the source with `ast`: `data_builders` (the lower layer) imports
nothing from `mosaic_jax`, and no two `mosaic_jax` modules import each other, directly or
through others, at module level (imports inside functions are how optional, heavy or upward
dependencies are deferred, and are not counted); and no function of either package is over
80 lines."""

import ast
import pathlib

REPO = pathlib.Path(__file__).resolve().parents[1]


def _module_name(path):
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _sources(package):
    return {_module_name(p): p for p in sorted((REPO / package).rglob("*.py"))}


def _imports(path, module, *, top_level_only):
    """(line, imported dotted name) of every import in the file; relative imports resolved
    against `module`; a ``from P import x`` gives ``P.x`` (a submodule or a name in P)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = []
    for node in nodes:
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                anchor = anchor[:len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join([*anchor, base] if base else anchor)
            found += [(node.lineno, f"{base}.{a.name}") for a in node.names]
    return found


def test_data_builders_import_nothing_from_mosaic_jax():
    offenders = [f"{path.relative_to(REPO)}:{line} imports {name}"
                 for module, path in _sources("data_builders").items()
                 for line, name in _imports(path, module, top_level_only=False)
                 if name == "mosaic_jax" or name.startswith("mosaic_jax.")]
    assert offenders == []


def _graph():
    """mosaic_jax module -> the mosaic_jax modules it imports at module level."""
    sources = _sources("mosaic_jax")
    graph = {}
    for module, path in sources.items():
        targets = set()
        for _, name in _imports(path, module, top_level_only=True):
            # The longest prefix that is one of our modules: "a.b.c" may be module a.b's name c.
            while name and name not in sources:
                name = name.rpartition(".")[0]
            if name and name != module:
                targets.add(name)
        graph[module] = targets
    return graph


def _cycle(graph):
    """One import cycle as a list of modules (first == last), or None."""
    state = {}  # module -> "open" while on the path, "done" after

    def visit(module, path):
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                return [*path[path.index(target):], target]
            if target not in state:
                found = visit(target, [*path, target])
                if found:
                    return found
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state:
            found = visit(module, [module])
            if found:
                return found
    return None


def test_no_import_cycle_among_mosaic_jax_modules():
    graph = _graph()
    assert "mosaic_jax.training.workdir" in graph["mosaic_jax.evaluation.report"]  # it sees imports
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


MAX_FUNCTION_LINES = 80


def test_no_function_over_80_lines_in_the_packages():
    """Long functions hide their steps; a new one over the limit is split, not grandfathered."""
    long = []
    for package in ("mosaic_jax", "data_builders"):
        for name, path in _sources(package).items():
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    lines = node.end_lineno - node.lineno + 1
                    if lines > MAX_FUNCTION_LINES:
                        long.append(f"{name}.{node.name}: {lines} lines")
    assert not long, long
