"""Find the external commands Python source runs or looks up, by reading its syntax tree.

What counts as running a command:

* a call to subprocess's run/Popen/call/check_call/check_output, os.execv(p), or
  asyncio's create_subprocess_exec, and shutil.which (a lookup means a later run);
* a call to any function of the scanned tree that passes one of its parameters on to
  one of those (found to a fixpoint: ``_run(argv)``, ``serving(argv, sock)``, ``have(tool)``);
* a name such as ``REQUIRED_TOOLS`` or ``TOOL_PACKAGE``: a list, tuple, set or dict of tools.

The command is read from a string literal: the first element of an argv list (also
through a local or module-level variable, ``[*PREFIX, ...]`` and ``for tool in (...)``),
or the name given to which/create_subprocess_exec. What is computed (``sys.executable``,
an f-string) is not a command this scan can name, and is left out.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

# How a callable takes its command: "argv", a list whose first element is the command, or
# "name", the command itself; at which position, or under which keyword.
Spec = tuple[str, int, str | None]

# The standard library's runners, by (module, function).
BASE_RUNNERS: dict[tuple[str, str], set[Spec]] = {
    **{("subprocess", f): {("argv", 0, None), ("argv", 0, "args")}
       for f in ("run", "Popen", "call", "check_call", "check_output")},
    ("asyncio", "create_subprocess_exec"): {("name", 0, None)},
    ("os", "execv"): {("name", 0, "path")},
    ("os", "execvp"): {("name", 0, "file")},
    ("shutil", "which"): {("name", 0, "cmd")},
}
TOOL_COLLECTION = re.compile(r"(^|_)TOOLS?($|_)")
MAX_DEPTH = 8  # variables resolved through at most this many assignments

Binding = tuple[str, ast.expr]  # ("value", expr) for name = expr; ("iter", expr): for name in expr


@dataclass(frozen=True)
class Use:
    """One place in the source that runs or looks up an external command."""

    command: str
    path: Path
    line: int

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.command}"


def _argument(call: ast.Call, pos: int, keyword: str | None) -> ast.expr | None:
    """The argument a call passes at ``pos`` (or as ``keyword``); None when unknown."""
    if any(isinstance(a, ast.Starred) for a in call.args[:pos]):
        return None
    if pos < len(call.args):
        return call.args[pos]
    return next((k.value for k in call.keywords if keyword and k.arg == keyword), None)


def _mentions_python_itself(node: ast.AST) -> bool:
    """Whether ``node`` refers to sys.executable or sys.prefix (Python's own commands)."""
    return any(isinstance(n, ast.Attribute) and n.attr in ("executable", "prefix")
               and isinstance(n.value, ast.Name) and n.value.id == "sys"
               for n in ast.walk(node))


def _own_nodes(scope: ast.AST) -> Iterator[ast.AST]:
    """The nodes of ``scope`` outside the functions and classes nested in it."""
    todo = list(ast.iter_child_nodes(scope))
    while todo:
        node = todo.pop()
        yield node
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda
                          | ast.ClassDef):
            todo.extend(ast.iter_child_nodes(node))


class Module:
    """One parsed source file, able to resolve the names in it to literals."""

    def __init__(self, path: Path, source: str) -> None:
        self.path = path
        self.stem = path.stem  # how other modules import it: ``from ...stem import f``
        self.tree = ast.parse(source, str(path))
        self._bindings: dict[ast.AST, dict[str, list[Binding]]] = {}
        # One walk collects what the scan asks for again and again.
        self.parent: dict[ast.AST, ast.AST] = {}
        self.calls: list[ast.Call] = []
        self.assignments: list[ast.Assign | ast.AnnAssign] = []
        # Local name -> (module, name in it), or (module, None) for a module itself.
        self.imports: dict[str, tuple[str, str | None]] = {}
        # The calls made in each function, also from functions nested in it.
        self.calls_in: dict[ast.FunctionDef | ast.AsyncFunctionDef, list[ast.Call]] = {}
        todo: list[tuple[ast.AST, tuple[ast.FunctionDef | ast.AsyncFunctionDef, ...]]] = [
            (self.tree, ())]
        while todo:
            node, functions = todo.pop()
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                functions = (*functions, node)
            for child in ast.iter_child_nodes(node):
                self.parent[child] = node
                todo.append((child, functions))
            if isinstance(node, ast.Call):
                self.calls.append(node)
                for f in functions:
                    self.calls_in.setdefault(f, []).append(node)
            elif isinstance(node, ast.Assign | ast.AnnAssign):
                self.assignments.append(node)
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.asname:
                        self.imports[a.asname] = (a.name.rsplit(".", 1)[-1], None)
                    else:
                        self.imports[a.name.split(".")[0]] = (a.name.split(".")[0], None)
            elif isinstance(node, ast.ImportFrom) and node.module:
                for a in node.names:
                    self.imports[a.asname or a.name] = (node.module.rsplit(".", 1)[-1], a.name)

    def callee(self, call: ast.Call) -> tuple[str | None, str] | None:
        """Which function a call reaches: (module, name), (None, name) for a method of an
        object of unknown type, None when it cannot be told."""
        func = call.func
        if isinstance(func, ast.Name):
            module, name = self.imports.get(func.id, (self.stem, func.id))
            return (module, name or func.id)
        if not isinstance(func, ast.Attribute):
            return None
        receiver = func.value
        if isinstance(receiver, ast.Name):
            if receiver.id in ("self", "cls"):
                return (self.stem, func.attr)
            if receiver.id in self.imports:
                module, name = self.imports[receiver.id]
                return (name or module, func.attr)  # ``from pkg import module``: name
        return (None, func.attr)

    def _scopes(self, node: ast.AST) -> Iterator[ast.AST]:
        """The function scopes enclosing ``node``, innermost first, then the module."""
        while node in self.parent:
            node = self.parent[node]
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                yield node
        yield self.tree

    def _scope_bindings(self, scope: ast.AST) -> dict[str, list[Binding]]:
        if scope not in self._bindings:
            found: dict[str, list[Binding]] = {}
            for node in _own_nodes(scope):
                if isinstance(node, ast.Assign):
                    for target in node.targets:
                        if isinstance(target, ast.Name):
                            found.setdefault(target.id, []).append(("value", node.value))
                elif (isinstance(node, ast.AnnAssign) and node.value is not None
                      and isinstance(node.target, ast.Name)):
                    found.setdefault(node.target.id, []).append(("value", node.value))
                elif (isinstance(node, ast.For | ast.AsyncFor | ast.comprehension)
                      and isinstance(node.target, ast.Name)):
                    found.setdefault(node.target.id, []).append(("iter", node.iter))
            self._bindings[scope] = found
        return self._bindings[scope]

    def bindings(self, name: ast.Name) -> list[Binding]:
        """What ``name`` may be bound to, from its innermost scope that binds it."""
        for scope in self._scopes(name):
            found = self._scope_bindings(scope).get(name.id)
            if found:
                return found
        return []

    def members(self, expr: ast.expr, depth: int = 0) -> list[ast.expr]:
        """The elements of a literal collection (a dict's keys), also through a name."""
        if depth > MAX_DEPTH:
            return []
        if isinstance(expr, ast.List | ast.Tuple | ast.Set):
            out: list[ast.expr] = []
            for e in expr.elts:
                out += self.members(e.value, depth + 1) if isinstance(e, ast.Starred) else [e]
            return out
        if isinstance(expr, ast.Dict):
            return [k for k in expr.keys if k is not None]
        if isinstance(expr, ast.Name):
            return [m for kind, v in self.bindings(expr) if kind == "value"
                    for m in self.members(v, depth + 1)]
        return []

    def names(self, expr: ast.expr, depth: int = 0) -> list[str]:
        """The command names ``expr`` may hold (a literal, or a name bound to literals)."""
        if depth > MAX_DEPTH:
            return []
        if isinstance(expr, ast.Constant) and isinstance(expr.value, str):
            return [expr.value]
        if isinstance(expr, ast.IfExp):
            return self.names(expr.body, depth + 1) + self.names(expr.orelse, depth + 1)
        if isinstance(expr, ast.BoolOp):
            return [c for v in expr.values for c in self.names(v, depth + 1)]
        if isinstance(expr, ast.Name):
            out: list[str] = []
            for kind, v in self.bindings(expr):
                values = self.members(v, depth + 1) if kind == "iter" else [v]
                out += [c for m in values for c in self.names(m, depth + 1)]
            return out
        return []

    def argv_commands(self, expr: ast.expr, depth: int = 0) -> list[str]:
        """The commands an argv ``expr`` may start with."""
        if depth > MAX_DEPTH:
            return []
        if isinstance(expr, ast.List | ast.Tuple):
            if not expr.elts:
                return []
            first = expr.elts[0]
            if isinstance(first, ast.Starred):
                return self.argv_commands(first.value, depth + 1)
            return self.names(first, depth + 1)
        if isinstance(expr, ast.BinOp) and isinstance(expr.op, ast.Add):
            return self.argv_commands(expr.left, depth + 1)
        if isinstance(expr, ast.IfExp):
            return (self.argv_commands(expr.body, depth + 1)
                    + self.argv_commands(expr.orelse, depth + 1))
        if isinstance(expr, ast.Name):
            out: list[str] = []
            for kind, v in self.bindings(expr):
                values = self.members(v, depth + 1) if kind == "iter" else [v]
                out += [c for m in values for c in self.argv_commands(m, depth + 1)]
            return out
        return []


def _parameters(func: ast.FunctionDef | ast.AsyncFunctionDef,
                module: Module) -> tuple[list[str], str | None]:
    """A function's positional parameters as its callers see them (no self), and *args."""
    names = [a.arg for a in func.args.posonlyargs + func.args.args]
    is_method = isinstance(module.parent.get(func), ast.ClassDef)
    static = any(isinstance(d, ast.Name) and d.id == "staticmethod"
                 for d in func.decorator_list)
    if is_method and not static and names and names[0] in ("self", "cls"):
        names = names[1:]
    return names, func.args.vararg.arg if func.args.vararg else None


class Runners:
    """The callables known to run a command: the standard library's, and the scanned
    tree's functions that hand a parameter on to one of them."""

    def __init__(self) -> None:
        self.functions: dict[tuple[str, str], set[Spec]] = {
            key: set(specs) for key, specs in BASE_RUNNERS.items()}
        self.methods: dict[str, set[Spec]] = {}  # by name, for calls on objects

    def of(self, module: Module, call: ast.Call) -> set[Spec]:
        """How the callee of ``call`` takes a command (empty: it runs none)."""
        callee = module.callee(call)
        if callee is None:
            return set()
        where, name = callee
        if where is None:
            return self.methods.get(name, set())
        return self.functions.get((where, name), set())

    def learn(self, modules: list[Module]) -> None:
        """Add every wrapper of a known runner, and wrappers of those, to a fixpoint."""
        changed = True
        while changed:
            changed = False
            for module in modules:
                for func, calls in module.calls_in.items():
                    specs = self._wrapper_specs(func, calls, module)
                    key = (module.stem, func.name)
                    if not specs - self.functions.get(key, set()):
                        continue
                    changed = True
                    self.functions.setdefault(key, set()).update(specs)
                    if isinstance(module.parent.get(func), ast.ClassDef):
                        self.methods.setdefault(func.name, set()).update(specs)

    def _wrapper_specs(self, func: ast.FunctionDef | ast.AsyncFunctionDef,
                       calls: list[ast.Call], module: Module) -> set[Spec]:
        """How ``func`` takes a command it hands on to a known runner (empty if it does not)."""
        params, vararg = _parameters(func, module)
        keyword_only = [a.arg for a in func.args.kwonlyargs]
        specs: set[Spec] = set()

        def spec(kind: str, name: str) -> None:
            if name in params:
                specs.add((kind, params.index(name), name))
            elif name in keyword_only:
                specs.add((kind, 1 << 30, name))  # never positional
            elif name == vararg and kind == "argv":
                specs.add(("name", len(params), None))  # f(*argv): the command comes first

        for call in calls:
            for kind, pos, keyword in self.of(module, call):
                arg = _argument(call, pos, keyword)
                if isinstance(arg, ast.Name):
                    spec(kind, arg.id)
                elif kind == "argv" and isinstance(arg, ast.List | ast.Tuple) and arg.elts:
                    first = arg.elts[0]
                    if isinstance(first, ast.Starred) and isinstance(first.value, ast.Name):
                        spec("argv", first.value.id)
                    elif isinstance(first, ast.Name):
                        spec("name", first.id)
        return specs


def _call_uses(module: Module, call: ast.Call, specs: set[Spec]) -> Iterator[Use]:
    path_kw = next((k.value for k in call.keywords if k.arg == "path"), None)
    if path_kw is not None and _mentions_python_itself(path_kw):
        return  # which(x, path=<Python's own bin>): a command that comes with Python
    shell = any(k.arg == "shell" and isinstance(k.value, ast.Constant) and k.value.value
                for k in call.keywords)
    for kind, pos, keyword in specs:
        arg = _argument(call, pos, keyword)
        if arg is None:
            continue
        if kind == "argv" and shell and isinstance(arg, ast.Constant):
            commands = str(arg.value).split()[:1]  # run("cmd args", shell=True)
        elif kind == "argv":
            commands = module.argv_commands(arg)
        elif isinstance(arg, ast.Starred):
            commands = module.argv_commands(arg.value)  # create_subprocess_exec(*argv)
        else:
            commands = module.names(arg)
        for command in commands:
            yield Use(command, module.path, call.lineno)


def _collection_uses(module: Module, node: ast.Assign | ast.AnnAssign) -> Iterator[Use]:
    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
    if node.value is None or not any(isinstance(t, ast.Name) and TOOL_COLLECTION.search(t.id)
                                     for t in targets):
        return
    for member in module.members(node.value):
        for command in module.names(member):
            yield Use(command, module.path, member.lineno)


def parse(files: Iterable[Path], root: Path) -> list[Module]:
    """The given Python files, parsed, named by their path relative to ``root``."""
    return [Module(p.relative_to(root), p.read_text()) for p in files]


def scan(modules: list[Module]) -> list[Use]:
    """Every command the given modules run or look up, with where."""
    runners = Runners()
    runners.learn(modules)
    uses: set[Use] = set()
    for module in modules:
        for call in module.calls:
            uses.update(_call_uses(module, call, runners.of(module, call)))
        for assignment in module.assignments:
            uses.update(_collection_uses(module, assignment))
    return sorted(uses, key=lambda u: (str(u.path), u.line, u.command))


def tool_packages(modules: list[Module]) -> list[tuple[Use, str]]:
    """Each command -> package pair a dict named like ``TOOL_PACKAGE`` states in the code."""
    out: list[tuple[Use, str]] = []
    for module in modules:
        for node in module.assignments:
            if not (isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict)):
                continue
            if not any(isinstance(t, ast.Name) and TOOL_COLLECTION.search(t.id)
                       and "PACKAGE" in t.id for t in node.targets):
                continue
            for key, value in zip(node.value.keys, node.value.values, strict=True):
                if (isinstance(key, ast.Constant) and isinstance(key.value, str)
                        and isinstance(value, ast.Constant) and isinstance(value.value, str)):
                    out.append((Use(key.value, module.path, key.lineno), value.value))
    return out
