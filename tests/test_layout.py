"""[layout] Test modules import shared helpers from tests/helpers/, never from one another; the package's
functions and modules stay short enough to read."""

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def _imported_modules(path: Path) -> list[str]:
    """Every module an `import` or `from ... import` of `path` may load (relative ones without their dots):
    `from a import b` names both `a` and `a.b`, as `b` may be a submodule."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            parts = [node.module] if node.module else []
            names.append(".".join(parts))
            names += [".".join([*parts, alias.name]) for alias in node.names]
    return names


def _is_test_module(name: str) -> bool:
    """`test_x`, `test_x.y`, `tests.test_x`, ... (`tests.helpers.*` is not)."""
    parts = name.split(".")
    if parts[0] == "tests":
        parts = parts[1:]
    return bool(parts) and parts[0].startswith("test_")


def test_no_test_module_imports_another():
    sources = sorted(TESTS.glob("test_*.py")) + [TESTS / "conftest.py", *sorted(TESTS.glob("helpers/*.py"))]
    assert len(sources) > 10, sources
    bad = {
        str(p.relative_to(TESTS.parent)): found
        for p in sources
        if (found := [n for n in _imported_modules(p) if _is_test_module(n)])
    }
    assert not bad, f"test modules imported (move the helper into tests/helpers/): {bad}"


def test_shared_helpers_live_in_the_helpers_package():
    loose = sorted(
        p.name for p in TESTS.glob("*.py") if not p.name.startswith("test_") and p.name != "conftest.py"
    )
    assert not loose, f"helper modules outside tests/helpers/: {loose}"
    assert (TESTS / "helpers" / "__init__.py").is_file()


PACKAGE = TESTS.parent / "jaxlora"
MAX_FUNCTION_LINES = 60  # from the `def` line to the last line of the body, docstring included
MAX_MODULE_LINES = 400
LONG_REASON = "over 60 lines:"  # `# over 60 lines: <why>` on the line above the def, or in the docstring


def _functions(tree: ast.AST, prefix: str = ""):
    """(qualified name, node) of every function and method in `tree`, nested ones included."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield prefix + node.name, node
            yield from _functions(node, f"{prefix}{node.name}.")
        elif isinstance(node, ast.ClassDef):
            yield from _functions(node, f"{prefix}{node.name}.")
        else:
            yield from _functions(node, prefix)


def _says_why(node: ast.FunctionDef, lines: list[str]) -> bool:
    """The line above the def (above its decorators) or the docstring gives a reason for the length."""
    first = min([node.lineno] + [d.lineno for d in node.decorator_list])
    above = lines[first - 2].strip() if first >= 2 else ""
    docstring = ast.get_docstring(node) or ""
    return (above.startswith("#") and LONG_REASON in above) or LONG_REASON in docstring


def test_no_function_over_60_lines_without_a_reason():
    long = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        lines = text.splitlines()
        rel = path.relative_to(TESTS.parent).as_posix()
        for name, node in _functions(ast.parse(text, str(path))):
            size = node.end_lineno - node.lineno + 1
            if size > MAX_FUNCTION_LINES and not _says_why(node, lines):
                long[f"{rel}:{name}"] = size
    assert len(list(PACKAGE.rglob("*.py"))) > 50
    assert not long, (
        f"functions over {MAX_FUNCTION_LINES} lines: {long}; move whole blocks into named helpers, or "
        f"say why on the line above the def (`# {LONG_REASON} a table of ...`)"
    )


def test_no_module_over_400_lines():
    sizes = {
        path.relative_to(TESTS.parent).as_posix(): len(path.read_text(encoding="utf-8").splitlines())
        for path in sorted(PACKAGE.rglob("*.py"))
    }
    big = {p: n for p, n in sizes.items() if n > MAX_MODULE_LINES}
    assert not big, f"modules over {MAX_MODULE_LINES} lines (split them by what they hold): {big}"
