"""The messages of the package's one-line errors, read from its source with ast (for tests/test_error_fixes.py).

A message is the string literals and f-string text of a `UserError(...)` call, of the local and imported names and
helper returns it is built from, and of the calls to helpers that raise one from their parameters (rules.py's
`_need(ok, key, fix)`). An f-string's `{...}` parts read as HOLE, so a partial name such as `train.{key}` is never
taken for a whole one.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "mixtral_ft"
HOLE = "\x00"  # an f-string's {...}


@cache
def modules() -> dict[str, ast.Module]:
    return {p.relative_to(ROOT).as_posix(): ast.parse(p.read_text(encoding="utf-8")) for p in sorted(PKG.rglob("*.py"))}


def module_file(dotted: str) -> str | None:
    for rel in (dotted.replace(".", "/") + ".py", dotted.replace(".", "/") + "/__init__.py"):
        if rel in modules():
            return rel
    return None


def functions(tree: ast.AST) -> list[ast.FunctionDef]:
    return [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]


def bindings(scope: ast.AST, top_only: bool) -> dict[str, list[ast.AST]]:
    """name -> the expressions assigned to it (a for loop's target: its iterable) in `scope`."""
    found: dict[str, list[ast.AST]] = {}
    nodes = scope.body if top_only else ast.walk(scope)
    for n in nodes:
        pairs = []
        if isinstance(n, ast.Assign | ast.AnnAssign | ast.AugAssign | ast.NamedExpr) and n.value is not None:
            pairs = [(t, n.value) for t in (n.targets if isinstance(n, ast.Assign) else [n.target])]
        elif isinstance(n, ast.For):
            pairs = [(n.target, n.iter)]
        elif isinstance(n, ast.FunctionDef | ast.ClassDef) and top_only:
            found.setdefault(n.name, []).append(n)
        elif isinstance(n, ast.ImportFrom) and (n.module or "").startswith("mixtral_ft"):
            for alias in n.names:
                found.setdefault(alias.asname or alias.name, []).append(ast.Constant((n.module, alias.name)))
        for target, value in pairs:
            for name in (t.id for t in ast.walk(target) if isinstance(t, ast.Name)):
                found.setdefault(name, []).append(value)
    return found


def resolve(name: str, rel: str, func: ast.AST | None) -> list[tuple[ast.AST, str, ast.AST | None]]:
    """What `name` means in function `func` of module `rel`: (node, its module, its function) each."""
    local = bindings(func, top_only=False) if func is not None else {}
    scope = func if name in local else None
    found = []
    for node in local.get(name) or bindings(modules()[rel], top_only=True).get(name, []):
        if isinstance(node, ast.Constant) and isinstance(node.value, tuple):  # from mixtral_ft.x import name
            other = module_file(node.value[0])
            found += resolve(node.value[1], other, None) if other else []
        else:
            found.append((node, rel, node if isinstance(node, ast.FunctionDef) else scope))
    return found


def texts(node: ast.AST, rel: str, func: ast.AST | None, depth: int = 0) -> list[tuple[str, str]]:
    """(text, file:line) of the strings an expression is built from: literals, f-strings (HOLE for each {...}),
    names, helpers' returns."""
    if depth > 4:
        return []
    if isinstance(node, ast.Constant):
        return [(node.value, f"{rel}:{node.lineno}")] if isinstance(node.value, str) else []
    found = []
    if isinstance(node, ast.JoinedStr):
        text = "".join(v.value if isinstance(v, ast.Constant) else HOLE for v in node.values)
        found.append((text, f"{rel}:{node.lineno}"))
        children = [v.value for v in node.values if isinstance(v, ast.FormattedValue)]
    else:
        children = list(ast.iter_child_nodes(node))
    if isinstance(node, ast.Name):
        for value, vrel, vfunc in resolve(node.id, rel, func):
            if not isinstance(value, ast.FunctionDef | ast.ClassDef):
                found += texts(value, vrel, vfunc, depth + 1)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        for value, vrel, _ in resolve(node.func.id, rel, func):
            if isinstance(value, ast.FunctionDef):
                returns = [r.value for r in ast.walk(value) if isinstance(r, ast.Return) and r.value is not None]
                found += [t for r in returns for t in texts(r, vrel, value, depth + 1)]
    return found + [t for child in children for t in texts(child, rel, func, depth)]


def _is_user_error(call: ast.AST) -> bool:
    return isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "UserError"


def message_helpers() -> set[tuple[str, str]]:
    """(module, function) of the helpers that raise a UserError built from their own parameters, like `_need`."""
    helpers: set[tuple[str, str]] = set()
    while True:
        before = len(helpers)
        for rel, tree in modules().items():
            for f in functions(tree):
                params = {a.arg for a in f.args.args + f.args.kwonlyargs}
                for call in (c for c in ast.walk(f) if isinstance(c, ast.Call)):
                    is_msg = _is_user_error(call) or (
                        isinstance(call.func, ast.Name) and _helper_of(call.func.id, rel, f, helpers) is not None
                    )
                    used = {n.id for a in call.args for n in ast.walk(a) if isinstance(n, ast.Name)}
                    if is_msg and used & params:
                        helpers.add((rel, f.name))
        if len(helpers) == before:
            return helpers


def _helper_of(name: str, rel: str, func: ast.AST | None, helpers: set) -> tuple[str, str] | None:
    for value, vrel, _ in resolve(name, rel, func):
        if isinstance(value, ast.FunctionDef) and (vrel, value.name) in helpers:
            return vrel, value.name
    return None


def _enclosing(tree: ast.Module) -> dict[ast.AST, ast.FunctionDef]:
    owner = {}
    for f in functions(tree):  # outer functions first, so an inner one overwrites for its own calls
        for n in ast.walk(f):
            owner[n] = f
    return owner


@cache
def messages() -> list[tuple[str, list[tuple[str, str]], str, ast.AST | None]]:
    """(file:line, its texts with theirs, module, enclosing function) of every UserError and message-helper call."""
    helpers, found = message_helpers(), []
    for rel, tree in modules().items():
        owner = _enclosing(tree)
        for call in (c for c in ast.walk(tree) if isinstance(c, ast.Call)):
            func = owner.get(call)
            helper = isinstance(call.func, ast.Name) and _helper_of(call.func.id, rel, func, helpers)
            if _is_user_error(call) or helper:
                strings = [t for a in [*call.args, *(k.value for k in call.keywords)] for t in texts(a, rel, func)]
                found.append((f"{rel}:{call.lineno}", strings, rel, func))
    return found


@cache
def reached_by() -> dict[str, set[str]]:
    """module -> the commands whose cmd_ function imports it, directly or through the modules it imports."""

    def imports(node):
        return {module_file(n.module) for n in ast.walk(node) if isinstance(n, ast.ImportFrom) and n.module} - {None}

    found: dict[str, set[str]] = {}
    for f in functions(modules()["mixtral_ft/commands.py"]):
        if not f.name.startswith("cmd_"):
            continue
        todo, seen = imports(f), set()
        while todo:
            rel = todo.pop()
            seen.add(rel)
            todo |= imports(modules()[rel]) - seen
        for rel in seen:
            found.setdefault(rel, set()).add(f.name.removeprefix("cmd_"))
    return found
