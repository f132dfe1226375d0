"""The drawing of the package's imports has no circle: every import of one deconvcuda module by
another (at the top of a file or inside a function, relative or absolute) is an edge, and the
modules must form no cycle. Run this file as a script to print the edges and any cycles."""
from __future__ import annotations

import ast
import sys
from pathlib import Path
from typing import Dict, List, Set

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "deconvcuda"


def modules() -> Dict[str, Path]:
    """{dotted name: file} of every module of the package (a package's name is its __init__.py); the
    compiled extension is a module too, one that imports nothing of the package."""
    found = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    for path in sorted((ROOT / PACKAGE).rglob("*.so")) + sorted((ROOT / PACKAGE).rglob("*.pyd")):
        parts = list(path.relative_to(ROOT).parts)
        found[".".join(parts[:-1] + [path.name.split(".")[0]])] = path
    return found


def imports(name: str, path: Path, known: Set[str]) -> Set[str]:
    """The package's modules that module ``name`` imports: ``from X import y`` counts as X.y where
    that is a module, else X."""
    is_package = path.name == "__init__.py"
    edges = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the module's package, or its parents
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[:len(base) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            targets = [f"{source}.{alias.name}" if f"{source}.{alias.name}" in known else source
                       for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # import a.b.c of a module a.b
                target = target.rpartition(".")[0]
            if target and target != name:
                edges.add(target)
    return edges


def graph() -> Dict[str, Set[str]]:
    found = modules()
    return {name: imports(name, path, set(found)) if path.suffix == ".py" else set() for name, path in found.items()}


def cycles(edges: Dict[str, Set[str]]) -> List[List[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, result, counter = {}, {}, [], set(), [], [0]

    def visit(node):
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for other in sorted(edges.get(node, ())):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                result.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10000))
    for node in sorted(edges):
        if node not in index:
            visit(node)
    return sorted(result)


def test_the_imports_of_the_package_form_no_cycle():
    edges = graph()
    assert "deconvcuda.cli.visualize" in edges and "deconvcuda.figures.gallery" in edges
    found = cycles(edges)
    assert not found, "import cycles among deconvcuda's modules: " + "; ".join(" <-> ".join(c) for c in found)


def test_the_cycle_finder_finds_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_application_layer_is_not_imported_by_the_engine():
    """cli and figures sit on top: nothing below them imports them (the package itself and
    ``python -m deconvcuda`` do)."""
    edges = graph()
    top = ("deconvcuda.cli", "deconvcuda.figures")
    below = [name for name in edges if name not in (PACKAGE, f"{PACKAGE}.__main__") and not name.startswith(top)]
    wrong = sorted(f"{name} -> {target}" for name in below for target in edges[name] if target.startswith(top))
    assert not wrong, wrong


if __name__ == "__main__":
    drawing = graph()
    for module in sorted(drawing):
        print(f"{module} -> {', '.join(sorted(drawing[module])) or '(nothing)'}")
    found = cycles(drawing)
    print("cycles:", "; ".join(" <-> ".join(c) for c in found) if found else "none")


#: The distribution that provides each third-party module the package imports.
DISTRIBUTIONS = {"torch": "torch", "numpy": "numpy", "PIL": "pillow", "tqdm": "tqdm", "matplotlib": "matplotlib",
                 "torchvision": "torchvision", "timm": "timm", "h5py": "h5py", "skimage": "scikit-image"}


def third_party_imports() -> Set[str]:
    """The top-level names of the modules outside the package and the standard library that it imports."""
    names = set()
    for path in modules().values():
        if path.suffix != ".py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                names.add(node.module.split(".")[0])
    return {name for name in names if name != PACKAGE and name not in sys.stdlib_module_names and name != "__future__"}


def test_the_declared_dependencies_are_what_the_package_imports():
    tomllib = __import__("pytest").importorskip("tomllib")
    import re

    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]

    def names(requirements):
        return {re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower() for requirement in requirements}

    imported = third_party_imports()
    unknown = sorted(imported - set(DISTRIBUTIONS))
    assert not unknown, f"imported but not in DISTRIBUTIONS (add where they come from, and declare them): {unknown}"
    required = names(project["dependencies"])
    extras = {extra: names(requirements) for extra, requirements in project["optional-dependencies"].items()}
    declared = required | set().union(*(extras[extra] for extra in extras if extra != "test"))
    assert {DISTRIBUTIONS[name] for name in imported} == declared    # nothing missing, nothing unused
    assert "torchvision" in extras["models"]                         # `pip install .[models]`, as the README says
    assert project["version"] == __import__("deconvcuda._version").__version__
    torch = next(requirement for requirement in project["dependencies"] if requirement.startswith("torch"))
    tested = ".".join(__import__("torch").__version__.split(".")[:2])
    assert f">={tested}" in torch and "<" in torch, f"the torch the tests run on ({tested}) is not declared: {torch}"
