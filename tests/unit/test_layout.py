"""The package's layout: its import graph (every import, also those inside functions) has no cycle,
and the training entry point stays a thin CLI over the one loop."""

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
    assert len(graph) > 30 and "fastvideo_grpo.trainer" in graph["fastvideo_grpo.runner"]
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_finds_a_planted_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_train_entry_point_is_a_thin_cli():
    assert len((PKG / "train.py").read_text().splitlines()) <= 200
    loops = [f.name for f in PKG.rglob("*.py") if "train_iteration()" in f.read_text()]
    assert loops == ["loop.py"], f"training iterations are driven outside the one loop: {loops}"


LAYERS = [  # docs/architecture.md, "Who may import whom": a module imports only from its layer or below
    ["registry", "dtypes", "io", "rng", "cuda_settings", "residency", "threads", "ops", "sde", "config", "toy.shapes"],
    ["models", "rewards", "distributed", "diversity"],
    ["grpo", "sde_window", "rollout", "nft", "passes", "trainer", "evaluate", "data", "rewards.build", "ema"],
    ["loop", "checkpoint", "metrics", "preflight", "runner", "run_folder", "toy", "watchdog", "benchmarks"],
    ["train", "evaluate_cli", "plan", "vae_blend", "benchmarks.cli"],
]


def _layer(module: str) -> int:
    """The layer of the longest LAYERS entry that ``module`` (relative to the package) starts with."""
    rel = module.split(".", 1)[1] if "." in module else ""
    best, layer = -1, -1
    for i, names in enumerate(LAYERS):
        for n in names:
            if (rel == n or rel.startswith(n + ".")) and len(n) > best:
                best, layer = len(n), i
    return layer


def test_modules_import_only_from_their_layer_or_below():
    graph = _graph()
    unplaced = sorted(m for m in graph if m != "fastvideo_grpo" and _layer(m) < 0)
    assert not unplaced, f"modules missing from LAYERS (and docs/architecture.md): {unplaced}"
    upward = [(m, n) for m, deps in graph.items() for n in deps
              if n != "fastvideo_grpo" and _layer(m) >= 0 and _layer(n) > _layer(m)]
    assert not upward, f"imports from a higher layer: {upward}"


def test_no_reference_outside_the_repository():
    """Docs and code point at docs/method.md, not at files a user's clone does not have."""
    root = PKG.parent
    offenders = [str(p.relative_to(root)) for p in root.rglob("*") if p.suffix in (".py", ".md", ".yaml", ".sh")
                 and ".venv" not in p.parts and p.is_file() and p.name != "test_layout.py"
                 and ("shared/reference" in p.read_text(errors="ignore") or "METHOD.md" in p.read_text(errors="ignore"))]
    assert not offenders, offenders
