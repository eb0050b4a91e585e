"""Read an InternEvo config file without running it.

An InternEvo config is a Python file of ``data = dict(...)``, ``model = dict(...)``,
``parallel = dict(...)`` ... Running it would run arbitrary code, so it is
*evaluated*, not executed: only assignments of literals, ``dict()``/``list()``/...
calls, arithmetic, f-strings, subscripts and names defined on earlier lines are
accepted; anything else is an :class:`EvotuneError` naming the line. The line of
every key is kept so that the written evotune config can cite it
(``data.micro_num (line 31)``).
"""

from __future__ import annotations

import ast
import operator
import os
from dataclasses import dataclass
from typing import Any

from evotune.errors import EvotuneError

_CALLS = {
    "dict": dict, "list": list, "tuple": tuple, "set": set, "int": int, "float": float, "str": str,
    "bool": bool, "min": min, "max": max, "abs": abs, "round": round, "len": len,
}
_BINOPS = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos, ast.Not: operator.not_}
_COMPARE = {
    ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
    ast.Gt: operator.gt, ast.GtE: operator.ge, ast.In: lambda a, b: a in b,
    ast.NotIn: lambda a, b: a not in b, ast.Is: operator.is_, ast.IsNot: operator.is_not,
}
_MAX_SIZE = 1_000_000  # longest string/list an expression may build (a config is small)


@dataclass
class InternEvoConfig:
    """The top-level names of an InternEvo config and the line of every (nested) key."""

    path: str
    values: dict[str, Any]
    lines: dict[str, int]  # "data.micro_num" -> line number

    def get(self, dotted: str, default: Any = None) -> Any:
        node: Any = self.values
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node

    def has(self, dotted: str) -> bool:
        sentinel = object()
        return self.get(dotted, sentinel) is not sentinel

    def cite(self, dotted: str) -> str:
        """``key (line N)``: how a written evotune setting names where it comes from."""
        line = self.lines.get(dotted)
        return f"{dotted} (line {line})" if line else dotted


class _Evaluator:
    """Evaluate the expressions of one config file against the names defined so far."""

    def __init__(self, path: str):
        self.path = path
        self.names: dict[str, Any] = {}

    def fail(self, node: ast.AST, what: str) -> EvotuneError:
        return EvotuneError(
            f"{self.path}:{getattr(node, 'lineno', '?')}: {what}; an InternEvo config can be migrated only "
            f"when it defines constants (literals, dict(...), arithmetic, names defined above)"
        )

    def eval(self, node: ast.AST) -> Any:
        method = getattr(self, f"_{type(node).__name__}", None)
        if method is None:
            raise self.fail(node, f"'{ast.unparse(node)}' is not allowed")
        value = method(node)
        if isinstance(value, (str, list, tuple, bytes)) and len(value) > _MAX_SIZE:
            raise self.fail(node, f"'{ast.unparse(node)}' builds a value of {len(value)} items")
        return value

    def _Constant(self, node: ast.Constant) -> Any:
        return node.value

    def _Name(self, node: ast.Name) -> Any:
        if node.id in self.names:
            return self.names[node.id]
        raise self.fail(node, f"name '{node.id}' is not defined above this line")

    def _List(self, node: ast.List) -> list:
        return [self.eval(e) for e in node.elts]

    def _Tuple(self, node: ast.Tuple) -> tuple:
        return tuple(self.eval(e) for e in node.elts)

    def _Set(self, node: ast.Set) -> set:
        return {self.eval(e) for e in node.elts}

    def _Dict(self, node: ast.Dict) -> dict:
        out: dict = {}
        for k, v in zip(node.keys, node.values):
            if k is None:  # {**other}
                out.update(self._mapping(v))
            else:
                out[self.eval(k)] = self.eval(v)
        return out

    def _mapping(self, node: ast.AST) -> dict:
        value = self.eval(node)
        if not isinstance(value, dict):
            raise self.fail(node, f"'**{ast.unparse(node)}' is not a dict")
        return value

    def _BinOp(self, node: ast.BinOp) -> Any:
        op = _BINOPS.get(type(node.op))
        if op is None:
            raise self.fail(node, f"operator in '{ast.unparse(node)}' is not allowed")
        left, right = self.eval(node.left), self.eval(node.right)
        if op is operator.pow and isinstance(right, (int, float)) and abs(right) > 1024:
            raise self.fail(node, f"exponent {right} is too large")
        try:
            return op(left, right)
        except Exception as e:  # noqa: BLE001 - any arithmetic error is the config's
            raise self.fail(node, f"'{ast.unparse(node)}' fails: {e}") from None

    def _UnaryOp(self, node: ast.UnaryOp) -> Any:
        op = _UNARY.get(type(node.op))
        if op is None:
            raise self.fail(node, f"operator in '{ast.unparse(node)}' is not allowed")
        return op(self.eval(node.operand))

    def _BoolOp(self, node: ast.BoolOp) -> Any:
        value = None
        for operand in node.values:
            value = self.eval(operand)
            if isinstance(node.op, ast.And) and not value:
                return value
            if isinstance(node.op, ast.Or) and value:
                return value
        return value

    def _Compare(self, node: ast.Compare) -> bool:
        left = self.eval(node.left)
        for op, comparator in zip(node.ops, node.comparators):
            right = self.eval(comparator)
            if not _COMPARE[type(op)](left, right):
                return False
            left = right
        return True

    def _IfExp(self, node: ast.IfExp) -> Any:
        return self.eval(node.body) if self.eval(node.test) else self.eval(node.orelse)

    def _Subscript(self, node: ast.Subscript) -> Any:
        container, key = self.eval(node.value), self.eval(node.slice)
        try:
            return container[key]
        except (KeyError, IndexError, TypeError) as e:
            raise self.fail(node, f"'{ast.unparse(node)}' fails: {type(e).__name__} {e}") from None

    def _Slice(self, node: ast.Slice) -> slice:
        parts = [None if p is None else self.eval(p) for p in (node.lower, node.upper, node.step)]
        return slice(*parts)

    def _JoinedStr(self, node: ast.JoinedStr) -> str:
        return "".join(str(self.eval(v)) for v in node.values)

    def _FormattedValue(self, node: ast.FormattedValue) -> str:
        value = self.eval(node.value)
        if node.conversion == ord("r"):
            value = repr(value)
        elif node.conversion == ord("s"):
            value = str(value)
        spec = self.eval(node.format_spec) if node.format_spec is not None else ""
        return format(value, spec)

    def _Call(self, node: ast.Call) -> Any:
        if not isinstance(node.func, ast.Name) or node.func.id not in _CALLS or node.func.id in self.names:
            raise self.fail(node, f"call '{ast.unparse(node.func)}(...)' is not allowed "
                                  f"(allowed: {', '.join(sorted(_CALLS))})")
        args = [self.eval(a) for a in node.args if not isinstance(a, ast.Starred)]
        if any(isinstance(a, ast.Starred) for a in node.args):
            raise self.fail(node, "'*args' is not allowed")
        kwargs: dict = {}
        for kw in node.keywords:
            if kw.arg is None:
                kwargs.update(self._mapping(kw.value))
            else:
                kwargs[kw.arg] = self.eval(kw.value)
        try:
            return _CALLS[node.func.id](*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - a bad call is the config's error
            raise self.fail(node, f"'{ast.unparse(node)}' fails: {e}") from None


def _key_lines(node: ast.AST, prefix: str, lines: dict[str, int]) -> None:
    """Record the line of every key of a ``dict(...)`` call or ``{...}`` literal, recursively."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict":
        for kw in node.keywords:
            if kw.arg is not None:
                lines[f"{prefix}.{kw.arg}"] = kw.value.lineno
                _key_lines(kw.value, f"{prefix}.{kw.arg}", lines)
    elif isinstance(node, ast.Dict):
        for k, v in zip(node.keys, node.values):
            if isinstance(k, ast.Constant) and isinstance(k.value, str):
                lines[f"{prefix}.{k.value}"] = k.lineno
                _key_lines(v, f"{prefix}.{k.value}", lines)


def read_internevo_config(path: str | os.PathLike) -> InternEvoConfig:
    """Evaluate an InternEvo config file safely (no imports, no calls but ``dict``/``int``/...).

    Raises :class:`EvotuneError` naming the file and line of anything else.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise EvotuneError(f"InternEvo config '{path}' does not exist")
    with open(path, encoding="utf-8") as f:
        source = f.read()
    try:
        tree = ast.parse(source, filename=path)
    except SyntaxError as e:
        raise EvotuneError(f"{path}:{e.lineno}: syntax error: {e.msg}") from None
    ev = _Evaluator(path)
    lines: dict[str, int] = {}
    for stmt in tree.body:
        if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant):
            continue  # a docstring or a bare string used as a comment block
        if isinstance(stmt, ast.Pass):
            continue
        if isinstance(stmt, (ast.Import, ast.ImportFrom)):
            raise ev.fail(stmt, f"'{ast.unparse(stmt)}': imports are not allowed "
                                f"(replace values read from modules or the environment by literals)")
        if isinstance(stmt, ast.AnnAssign) and stmt.value is not None and isinstance(stmt.target, ast.Name):
            targets, value_node = [stmt.target], stmt.value
        elif isinstance(stmt, ast.Assign):
            targets, value_node = stmt.targets, stmt.value
        else:
            kind = type(stmt).__name__.lower()
            raise ev.fail(stmt, f"a '{kind}' statement is not allowed")
        value = ev.eval(value_node)
        for target in targets:
            if isinstance(target, ast.Name):
                ev.names[target.id] = value
                lines[target.id] = stmt.lineno
                _key_lines(value_node, target.id, lines)
            elif isinstance(target, ast.Subscript) and isinstance(target.value, ast.Name):
                container, key = ev.eval(target.value), ev.eval(target.slice)
                if not isinstance(container, dict):
                    raise ev.fail(stmt, f"'{ast.unparse(target)}': only dict items can be assigned")
                container[key] = value
                lines[f"{target.value.id}.{key}"] = stmt.lineno
            else:
                raise ev.fail(stmt, f"assignment to '{ast.unparse(target)}' is not allowed")
    return InternEvoConfig(path, ev.names, lines)
