"""The package's layout: its import graph (every import, also those inside functions) has no cycle, between
files or between folders; folders import only from their layer or below; the root holds only config.py and
the package face; and the training entry point stays a thin CLI over the one loop."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "fastvideo_grpo"


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _is_main_guard(node: ast.AST) -> bool:
    return (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
            and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__")


def _imports(path: Path, modules: set) -> set:
    """Package modules imported anywhere in ``path`` except under ``if __name__ == "__main__":``."""
    tree = ast.parse(path.read_text())
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    skip = {id(n) for top in ast.walk(tree) if _is_main_guard(top) for n in ast.walk(top)}
    out = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")
                up = up[: len(up) - (node.level - 1)]
                base = ".".join(up + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        for t in targets:
            while t and t not in modules:  # "a.b.c" names a module or something inside one
                t = t.rsplit(".", 1)[0] if "." in t else ""
            if t and t != name:
                out.add(t)
    return out


def _graph():
    files = sorted(PKG.rglob("*.py"))
    modules = {_module_name(f) for f in files}
    return {_module_name(f): _imports(f, modules) for f in files}


def _cycle(graph):
    """One import cycle as a list of modules, or None."""
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if n.startswith(m + "."):  # a package importing its own submodules is not a cycle
                continue
            if state.get(n) == "open":
                return stack[stack.index(n):] + [n]
            if n not in state:
                found = visit(n)
                if found:
                    return found
        stack.pop()
        state[m] = "done"
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def _strip_packages(graph):
    """Edges to a package stand for its __init__ importing its submodules; drop package -> own child."""
    return {m: {n for n in deps if not n.startswith(m + ".")} for m, deps in graph.items()}


def test_import_graph_has_no_cycle():
    graph = _strip_packages(_graph())
    assert len(graph) > 30 and "fastvideo_grpo.training.trainer" in graph["fastvideo_grpo.training.runner"]
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_finds_a_planted_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
    # and between folders: models -> toy -> training -> models (the cycle the old flat layout had)
    planted = {"fastvideo_grpo.models.toy": {"fastvideo_grpo.toy.demo"},
               "fastvideo_grpo.toy.demo": {"fastvideo_grpo.training.runner"},
               "fastvideo_grpo.training.runner": {"fastvideo_grpo.models.base"}}
    assert _cycle(_folder_graph(planted)) == ["models", "toy", "training", "models"]


def test_train_entry_point_is_a_thin_cli():
    assert len((PKG / "cli" / "train.py").read_text().splitlines()) <= 200
    loops = [f.name for f in PKG.rglob("*.py") if "train_iteration()" in f.read_text()]
    assert loops == ["loop.py"], f"training iterations are driven outside the one loop: {loops}"


LAYERS = [  # docs/architecture.md, "Who may import whom": a folder imports only from its layer or below
    ["utils", "sde", "config", "toy"],  # foundations (config.py is the root's one module; toy/ the task vocabulary)
    ["models", "rewards", "distributed"],
    ["data", "algorithms"],
    ["training"],
    ["benchmarks"],  # the benchmark suites: evaluation over training's sampling (docs/benchmarks.md)
    ["cli"],
]


def _folder(module: str) -> str:
    """The top-level folder of a package module (``config`` for the root's config.py, "" for the package face)."""
    rel = module.split(".", 1)[1] if "." in module else ""
    return rel.split(".", 1)[0]


def _layer(module: str) -> int:
    folder = _folder(module)
    return next((i for i, names in enumerate(LAYERS) if folder in names), -1)


def _folder_graph(graph):
    """folder -> the folders its modules import (the package face, which imports nothing, left out)."""
    out = {}
    for m, deps in graph.items():
        a = _folder(m)
        if not a:
            continue
        out.setdefault(a, set()).update(b for b in map(_folder, deps) if b and b != a)
    return out


def test_folder_graph_has_no_cycle_and_follows_the_layers():
    graph = _graph()
    folders = _folder_graph(graph)
    assert {"utils", "sde", "models", "rewards", "distributed", "data", "algorithms", "training", "cli"} <= set(folders)
    cycle = _cycle(folders)
    assert cycle is None, "import cycle between folders: " + " -> ".join(cycle)
    unplaced = sorted(m for m in graph if m != "fastvideo_grpo" and _layer(m) < 0)
    assert not unplaced, f"modules outside the folders of LAYERS (and docs/architecture.md): {unplaced}"
    upward = sorted((m, n) for m, deps in graph.items() for n in deps
                    if n != "fastvideo_grpo" and _layer(m) >= 0 and _layer(n) > _layer(m))
    assert not upward, f"imports from a higher layer: {upward}"


def test_the_package_root_holds_only_the_config_and_the_package_face():
    assert sorted(p.name for p in PKG.glob("*.py")) == ["__init__.py", "config.py"]
    face = ast.parse((PKG / "__init__.py").read_text())
    assert all(isinstance(n, (ast.Expr, ast.Assign)) for n in face.body)  # a docstring and __version__


def test_toy_holds_only_the_task_vocabulary():
    assert sorted(p.name for p in (PKG / "toy").glob("*.py")) == ["__init__.py", "shapes.py"]


def test_no_reference_outside_the_repository():
    """Docs and code point at docs/method.md, not at files a user's clone does not have."""
    root = PKG.parent
    offenders = [str(p.relative_to(root)) for p in root.rglob("*") if p.suffix in (".py", ".md", ".yaml", ".sh")
                 and ".venv" not in p.parts and p.is_file() and p.name != "test_layout.py"
                 and ("shared/reference" in p.read_text(errors="ignore") or "METHOD.md" in p.read_text(errors="ignore"))]
    assert not offenders, offenders
