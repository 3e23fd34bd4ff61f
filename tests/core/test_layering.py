"""ecif_core is a library: it never imports web, database, broker or worker code."""
import ast
from pathlib import Path

import ecif_core

# the service layer and the packages of the `service` extra (pyproject.toml): `pip install -e .` has none of them
FORBIDDEN = ("services", "workers", "fastapi", "starlette", "celery", "redis", "sqlalchemy", "alembic", "psycopg",
             "pydantic", "pydantic_settings", "uvicorn", "multipart", "httpx", "prometheus_client", "matplotlib", "tqdm")


def test_ecif_core_imports_no_service_layer():
    offenders = []
    for path in Path(ecif_core.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in FORBIDDEN]
    assert not offenders, offenders


ROOT = Path(ecif_core.__file__).parent.parent
PACKAGES = ("ecif_core", "services", "workers")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports, every import statement counted (top level, inside
    functions and under TYPE_CHECKING alike: a lazy import is still a dependency)."""
    modules = {_module_name(p): p for package in PACKAGES for p in (ROOT / package).rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[:len(anchor) - (node.level - 1)]
                    base = ".".join([*anchor, base] if base else anchor)
                targets = [f"{base}.{a.name}" for a in node.names] + [base]
            else:
                continue
            for target in targets:
                # the deepest project module the name refers to (a module, or a name inside one)
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each a list of module names;
    a package's __init__ importing its own submodules is not an edge back (submodules never need it)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _without_package_parents(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """Edges to a package that is a parent of the importer are its __init__ (a facade that imports
    its submodules): `from ecif_core.stages import plan` names the submodule, resolved above."""
    return {name: {t for t in targets if not name.startswith(f"{t}.")} for name, targets in graph.items()}


def test_no_import_circle_between_modules():
    """Each module's imports point one way: a circle means neither module can be read (or
    loaded) without the other, and it is how ecif_core's layout used to hide its layers."""
    assert _cycles(_without_package_parents(_import_graph())) == []


def test_the_cycle_finder_finds_a_planted_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]


def test_services_never_import_workers_and_workers_only_import_down():
    """services (API, CLI, pipeline) never import workers: the dispatcher and the task names live
    in services and in the stage table; workers import services and ecif_core, never the other way."""
    graph = _import_graph()
    upward = sorted(f"{name} -> {target}" for name, targets in graph.items() for target in targets
                    if (name.startswith("services") and target.startswith("workers"))
                    or (name.startswith("ecif_core") and not target.startswith("ecif_core")))
    assert upward == []


def test_ecif_core_is_organised_in_sub_packages_of_bounded_modules():
    """The folders show the pipeline (data, models, influence, stages, edit, trace), and no module is
    so long that it holds several jobs again."""
    core = Path(ecif_core.__file__).parent
    packages = [p.parent.name for p in core.glob("*/__init__.py")]
    assert {"data", "models", "influence", "stages", "edit", "trace"} <= set(packages)
    too_long = {str(p.relative_to(core)): n for p in core.rglob("*.py")
                if (n := len(p.read_text().splitlines())) > 400}
    assert too_long == {}
