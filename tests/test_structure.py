"""The package's shape: no import cycle between its modules, short functions, plain `__init__`s.

Read from the source with ``ast`` (nothing is imported). An import is an edge from the module
that writes it to the module it names (``from imgcls_jax.a import b`` names ``imgcls_jax.a.b``
when that is a module, else ``imgcls_jax.a``), wherever it stands (function bodies included,
``if TYPE_CHECKING:`` blocks left out), and so is a module loaded by name
(``importlib.import_module("imgcls_jax.x")`` with a literal name, e.g. in a module
``__getattr__``): an edge too, so a cycle cannot hide behind it.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "imgcls_jax"
#: Lines of code (docstring excluded) a function may have without saying why in its docstring
#: ("Long: <reason>").
MAX_LINES = 60


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines = set()
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.If)
            and getattr(node.test, "id", getattr(node.test, "attr", "")) == "TYPE_CHECKING"
        ):
            for child in node.body:
                lines.update(range(child.lineno, child.end_lineno + 1))
    return lines


def _imported_by_name(node: ast.AST) -> str | None:
    """The module ``importlib.import_module("...")`` / ``import_module("...")`` / ``__import__``
    loads, when ``node`` is such a call with a literal name."""
    if not isinstance(node, ast.Call) or not node.args:
        return None
    func = getattr(node.func, "attr", getattr(node.func, "id", ""))
    arg = node.args[0]
    if (
        func in ("import_module", "__import__")
        and isinstance(arg, ast.Constant)
        and isinstance(arg.value, str)
    ):
        return arg.value
    return None


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    tree = ast.parse(path.read_text())
    skip = _type_checking_lines(tree)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if named := _imported_by_name(node):
            found.add(named)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + [base]
                ).strip(".")
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return {m for m in found if m in known and m != name}


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(name, path, set(mods)) for name, path in mods.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_sees_imports_inside_functions():
    graph = import_graph()
    assert "imgcls_jax.train.loop" in graph["imgcls_jax.train"]  # a re-export
    assert "imgcls_jax.models.registry" in graph["imgcls_jax.config"]  # inside a method


def test_the_graph_sees_modules_loaded_by_name(tmp_path):
    """``importlib.import_module`` in a module ``__getattr__`` (how deprecation aliases load
    their targets) is an edge, and a cycle through it is found."""
    (tmp_path / "a.py").write_text(
        "import importlib\n\ndef __getattr__(name):\n    return importlib.import_module('pkg.b')\n"
    )
    (tmp_path / "b.py").write_text("from pkg import a\n")
    known = {"pkg.a", "pkg.b"}
    graph = {m: imports_of(m, tmp_path / f"{m[4:]}.py", known) for m in known}
    assert graph == {"pkg.a": {"pkg.b"}, "pkg.b": {"pkg.a"}}
    assert cycles(graph) == [["pkg.a", "pkg.b"]]


def test_no_import_cycle_between_modules():
    found = cycles(import_graph())
    assert not found, f"import cycles: {found}"


def test_layers_do_not_import_upwards():
    """config is a leaf; models, weights and parallel never import training or evaluation;
    train never imports evaluate, hpo or the command line."""
    graph = import_graph()
    rules = {
        "imgcls_jax.config": ("imgcls_jax.train", "imgcls_jax.evaluate", "imgcls_jax.data", "imgcls_jax.hpo"),
        "imgcls_jax.models": ("imgcls_jax.train", "imgcls_jax.evaluate", "imgcls_jax.hpo", "imgcls_jax.cli"),
        "imgcls_jax.weights": ("imgcls_jax.train", "imgcls_jax.evaluate", "imgcls_jax.hpo", "imgcls_jax.cli"),
        "imgcls_jax.parallel": (
            "imgcls_jax.train",
            "imgcls_jax.evaluate",
            "imgcls_jax.data",
            "imgcls_jax.hpo",
        ),
        "imgcls_jax.train": ("imgcls_jax.evaluate", "imgcls_jax.hpo", "imgcls_jax.cli"),
    }
    bad = [
        (src, dst)
        for src, targets in graph.items()
        for dst in targets
        for layer, banned in rules.items()
        if (src == layer or src.startswith(layer + ".")) and dst.startswith(banned)
    ]
    assert not bad, bad


def long_functions() -> list[str]:
    found = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            doc = ast.get_docstring(node) or ""
            body = node.body[1:] if doc else node.body
            lines = (body[-1].end_lineno - body[0].lineno + 1) if body else 0
            if lines > MAX_LINES and "Long:" not in doc:
                found.append(f"{name}.{node.name} ({lines} lines)")
    return found


def test_functions_are_short_or_say_why():
    assert not long_functions()


@pytest.mark.parametrize(
    "init", sorted(p for p in PACKAGE.rglob("__init__.py")), ids=lambda p: module_name(p)
)
def test_every_init_only_re_exports(init):
    """Imports, ``__all__`` and a docstring only."""
    for node in ast.parse(init.read_text()).body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            continue
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue  # docstring
        if isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            assert all(
                getattr(t, "id", "").isupper() or t.id.startswith("_") or t.id.startswith("__")
                for t in targets
            )
            continue
        raise AssertionError(f"{init}: not a re-export: {ast.dump(node)[:200]}")


def exported_objects(init: Path) -> dict[str, str]:
    """The names an ``__init__`` re-exports that are not modules: name -> the module it comes from."""
    known = set(modules())
    found = {}
    for node in ast.parse(init.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                if f"{node.module}.{alias.name}" not in known:
                    found[alias.asname or alias.name] = node.module
    return found


@pytest.mark.parametrize(
    "init", sorted(p for p in PACKAGE.rglob("__init__.py")), ids=lambda p: module_name(p)
)
def test_no_public_name_is_also_a_module(init):
    """``imgcls_jax.evaluate.predict`` is either the function or a module, never both: a package
    that exports an object under the name of one of its own modules makes ``import
    pkg.name`` replace the object (Python sets a submodule as its package's attribute)."""
    submodules = {p.stem for p in init.parent.glob("*.py")} | {
        p.name for p in init.parent.iterdir() if (p / "__init__.py").is_file()
    }
    clashes = sorted(set(exported_objects(init)) & (submodules - {"__init__"}))
    assert not clashes, f"{module_name(init)} exports {clashes}, which are also its modules"


def readme_layout() -> dict[str, str]:
    """The README's layout block: folder (``""`` for the package root) -> the text listing it."""
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Layout", 1)[1].split("```", 2)[1]
    sections, current = {}, None
    for line in block.splitlines()[1:]:
        if not line.startswith("  ") or not line.strip():
            continue
        head = line.split()[0]
        if not line.startswith("   ") and head.endswith("/"):
            current = head.rstrip("/")
        elif not line.startswith("   "):
            current = ""
        sections[current] = sections.get(current, "") + " " + line
    return sections


def test_readme_layout_names_every_module():
    sections = readme_layout()
    missing = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "__init__.py":
            continue
        folder = str(path.parent.relative_to(PACKAGE)).replace(".", "")
        if path.name not in sections.get(folder, ""):
            missing.append(str(path.relative_to(ROOT)))
    folders = {
        str(p.relative_to(PACKAGE)) for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"
    }
    assert not missing and folders <= set(sections), (missing, folders - set(sections))
