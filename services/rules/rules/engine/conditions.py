"""Conditions: a rule's CEL `when` (and a line rule's `line_when`), compiled once per ruleset version.

A condition is a pure function of the fields it reads, so each condition memoizes its result on those
fields' values, and on a miss it is executed with a map holding only those fields (converting a whole
event map costs ~15 µs; a few scalars ~1 µs). A plain `var.field <op> literal` is answered in Python when
the value has the literal's type (what CEL answers too).

A condition never fails an evaluation: any error while running it (division by zero, overflow, an index
or key that is not there, a type error, a panic of the CEL library) counts as not met, with the reason
in the rule's outcome. The library has no cost limit, so a condition runs only on inputs within a budget
(INPUT_ITEMS list items and map entries, INPUT_CHARACTERS of text, over the values it reads); over it,
the condition counts as not met too. With the limits on its text (rules.ruleset), that bounds its cost.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any, Final

import cel

from rules.engine.basics import MEMO_LIMIT
from rules.ruleset import condition_limits

# The evaluation budget of one condition: what the values it reads may hold in all (docs/rules.md, Limits).
INPUT_ITEMS: Final = 250
INPUT_CHARACTERS: Final = 25_000
REASON_LENGTH: Final = 300
_MISSING: Final = object()


class Condition:
    """A compiled CEL condition, memoized on the fields it reads."""

    def __init__(self, source: str) -> None:
        self.source = source
        # A version stored before a limit existed may break it: such a condition is never run (not met).
        self.refused = condition_limits(source) or ""
        if not self.refused:
            try:
                self.program = cel.compile(source)
            except Exception as exc:  # validated at creation; kept safe for whatever is stored
                self.refused = f"CEL: {_shorten(str(exc))}"
        if self.refused:
            self.refused = f"condition {_shorten(source)!r} refused: {self.refused}"
            self.program = cel.compile("false")
        self.variables: tuple[str, ...] = tuple(sorted(self.program.variables()))
        self.fields: dict[str, tuple[str, ...] | None] = {v: fields_read(source, v) for v in self.variables}
        self._plan = tuple((v, self.fields[v]) for v in self.variables)
        # The common case, every variable read by plain field selections: the memo key is the flat tuple
        # of those fields' values, taken with one subscript each (a missing one takes the general path).
        self._flat: tuple[tuple[str, str], ...] | None = (
            tuple((v, f) for v in self.variables for f in self.fields[v] or ())
            if all(self.fields[v] for v in self.variables)
            else None
        )
        # The first two (variable, field) pairs of the flat key, unpacked: the usual keys have one or two.
        padded = (*(self._flat or ()), ("", ""), ("", ""))
        self._v1, self._f1 = padded[0]
        self._v2, self._f2 = padded[1]
        self._memo: dict[tuple[Any, ...], bool | str] = {}
        self._flat_memo: dict[tuple[Any, ...], bool | str] = {}
        # `var.field <op> literal`, answered in `check` without CEL: its parts as typed attributes, so the
        # compiled comparison runs on a C double, a native int or a str.
        self._kind = _NOT_SIMPLE
        self._var = self._name = self._text = ""
        self._op = _EQ
        self._double = 0.0
        self._int = 0
        simple = _simple_comparison(source)
        if simple is not None:
            self._var, self._name, op, literal = simple
            self._op = _OPERATORS[op]
            if isinstance(literal, float):
                self._kind, self._double = _DOUBLE, literal
            elif isinstance(literal, int):
                self._kind, self._int = _INT, literal
            else:
                self._kind, self._text = _STRING, literal

    def __call__(self, scope: Mapping[str, Mapping[str, Any]], memo: bool = True) -> bool | str:
        """True/False, or the reason the condition could not be evaluated (which counts as not met).

        Memoize only where every field has one type (built-in events): the memo key compares values, and
        1, 1.0 and True are equal keys while CEL treats them differently.
        """
        return self.check(scope if isinstance(scope, dict) else dict(scope), memo)

    def check(self, scope: dict[str, Mapping[str, Any]], memo: bool = True) -> bool | str:
        """What the evaluation loop calls (see __call__)."""
        kind = self._kind
        if kind != _NOT_SIMPLE:
            # `var.field <op> literal` answered here when the value has the literal's exact type (a double
            # finite, an int within int64), where CEL's result is the same; otherwise (a missing field,
            # another type, which CEL may refuse) CEL decides through the memoized path.
            values = scope.get(self._var)
            if isinstance(values, dict):
                value = values.get(self._name, _MISSING)
                if kind == _DOUBLE:
                    if type(value) is float and not math.isinf(value) and not math.isnan(value):
                        return _compare_doubles(self._op, value, self._double)
                elif kind == _INT:
                    if type(value) is int and _INT64_MIN <= value <= _INT64_MAX:
                        return _compare_ints(self._op, value, self._int)
                elif type(value) is str:
                    equal = value == self._text
                    return equal if self._op == _EQ else not equal
        return self._memoized(scope, memo)

    def _memoized(self, scope: dict[str, Mapping[str, Any]], memo: bool) -> bool | str:
        flat = self._flat
        if flat is None:
            return self._general(scope, memo)
        if not memo:
            return self._execute(scope)
        # The memo key, the flat tuple of the fields' values, with one subscript each; a missing field or
        # an unhashable value takes the general path.
        key: tuple[Any, ...]
        try:
            if len(flat) == 1:
                key = (scope[self._v1][self._f1],)
            elif len(flat) == 2:
                key = (scope[self._v1][self._f1], scope[self._v2][self._f2])
            else:
                key = tuple([scope[v][f] for v, f in flat])
            hit = self._flat_memo.get(key)
        except (KeyError, TypeError):
            return self._general(scope, memo)
        if hit is not None:
            return hit
        result = self._execute(scope)
        if len(self._flat_memo) >= MEMO_LIMIT:
            self._flat_memo.clear()
        self._flat_memo[key] = result
        return result

    def _general(self, scope: Mapping[str, Mapping[str, Any]], memo: bool = True) -> bool | str:
        """The memo keyed on every variable's fields (or whole value), for any scope."""
        if not memo:
            return self._execute(scope)
        parts: list[Any] = []
        for var, fields in self._plan:
            value = scope.get(var, _MISSING)
            if fields is None or not isinstance(value, dict):
                parts.append(tuple(sorted(value.items())) if isinstance(value, dict) else value)
            else:
                get = value.get
                parts.append(tuple([get(f, _MISSING) for f in fields]))
        key = tuple(parts)
        try:
            hit = self._memo.get(key)
        except TypeError:  # an unhashable value (a list or map in the data): evaluate without the memo
            return self._execute(scope)
        if hit is not None:
            return hit
        result = self._execute(scope)
        if len(self._memo) >= MEMO_LIMIT:
            self._memo.clear()
        self._memo[key] = result
        return result

    def _execute(self, scope: Mapping[str, Mapping[str, Any]]) -> bool | str:
        if self.refused:
            return self.refused
        args: dict[str, Any] = {}
        for var in self.variables:
            if var not in scope:
                continue  # a comprehension variable; CEL binds it
            value = scope[var]
            fields = self.fields[var]
            args[var] = value if fields is None else {f: value[f] for f in fields if f in value}
        over = _over_budget(args)
        if over:
            return f"condition {self.source!r} not evaluated (counts as not met): {over}"
        try:
            result = self.program.execute(args)
        except Exception as exc:
            return f"condition {self.source!r} failed (counts as not met): {type(exc).__name__}: {_shorten(str(exc))}"
        except BaseException as exc:
            # A panic inside the CEL library arrives as pyo3's PanicException, a BaseException; anything
            # else of that kind (cancellation, exit) is not the condition's.
            if type(exc).__name__ != "PanicException":
                raise
            return f"condition {self.source!r} failed (counts as not met): {type(exc).__name__}: {_shorten(str(exc))}"
        if not isinstance(result, bool):
            return f"condition {self.source!r} returned {result!r}, not a bool"
        return result


def _shorten(text: str) -> str:
    return text if len(text) <= REASON_LENGTH else text[:REASON_LENGTH] + "…"


def _over_budget(args: dict[str, Any]) -> str:
    """Why the values handed to a condition are over the evaluation budget, or "" (walks them once,
    stopping as soon as a bound is passed)."""
    items = 0
    characters = 0
    stack: list[Any] = list(args.values())
    while stack:
        value = stack.pop()
        if isinstance(value, str):
            characters += len(value)
        elif isinstance(value, dict):
            items += len(value)
            if items > INPUT_ITEMS:
                break
            for key, item in value.items():
                if isinstance(key, str):
                    characters += len(key)
                stack.append(item)
        elif isinstance(value, (list, tuple)):
            items += len(value)
            if items > INPUT_ITEMS:
                break
            stack.extend(value)
        elif isinstance(value, (bytes, bytearray)):
            characters += len(value)
        if characters > INPUT_CHARACTERS:
            return f"the values it reads hold more than {INPUT_CHARACTERS} characters of text (the evaluation budget)"
    if items > INPUT_ITEMS:
        return f"the values it reads hold more than {INPUT_ITEMS} list items and map entries (the evaluation budget)"
    return ""


_INT64_MIN: Final = -(2**63)
_INT64_MAX: Final = 2**63 - 1
# A simple comparison's literal type and operator, as codes (compared as C integers once compiled).
_NOT_SIMPLE: Final = 0
_DOUBLE: Final = 1
_INT: Final = 2
_STRING: Final = 3
_EQ: Final = 0
_NE: Final = 1
_LT: Final = 2
_LE: Final = 3
_GT: Final = 4
_GE: Final = 5
_OPERATORS: Final = {"==": _EQ, "!=": _NE, "<": _LT, "<=": _LE, ">": _GT, ">=": _GE}


# One comparison function per native type (double, int): compiled, each compares unboxed values; a shared
# generic one would compare Python objects.
def _compare_doubles(op: int, value: float, literal: float) -> bool:
    if op == _EQ:
        return value == literal
    if op == _NE:
        return value != literal
    if op == _LT:
        return value < literal
    if op == _LE:
        return value <= literal
    if op == _GT:
        return value > literal
    return value >= literal


def _compare_ints(op: int, value: int, literal: int) -> bool:
    if op == _EQ:
        return value == literal
    if op == _NE:
        return value != literal
    if op == _LT:
        return value < literal
    if op == _LE:
        return value <= literal
    if op == _GT:
        return value > literal
    return value >= literal


_SIMPLE: Final = re.compile(
    r"\s*([A-Za-z_]\w*)\s*\.\s*([A-Za-z_]\w*)\s*(==|!=|<=|>=|<|>)\s*"
    r"(?:(-?\d+\.\d+)|(-?\d+)|'([A-Za-z0-9_ .:-]*)'|\"([A-Za-z0-9_ .:-]*)\")\s*"
)


def _simple_comparison(source: str) -> tuple[str, str, str, float | int | str] | None:
    """(var, field, operator, literal) for `var.field <op> literal` with a double, int or plain string
    literal (strings: only == and !=), else None."""
    match = _SIMPLE.fullmatch(source)
    if match is None:
        return None
    var, name, op, double, integer, single, double_quoted = match.groups()
    literal: float | int | str
    if double is not None:
        literal = float(double)
    elif integer is not None:
        literal = int(integer)
    else:
        if op not in ("==", "!="):
            return None
        literal = single if single is not None else double_quoted
    return var, name, op, literal


def fields_read(source: str, var: str) -> tuple[str, ...] | None:
    """The fields of `var` the expression selects (`var.field`), or None when it uses `var` otherwise.

    A conservative superset: a name inside a string literal only adds a field, and any use that is not
    a plain field selection (`var[...]`, `var` passed whole, a macro binding) falls back to the full
    map. CEL parses and evaluates the expression; this only decides what to hand it.
    """
    fields: set[str] = set()
    for match in re.finditer(rf"(?<![\w.]){re.escape(var)}\b", source):
        selected = re.match(r"\s*\.\s*([A-Za-z_]\w*)", source[match.end() :])
        if selected is None:
            return None
        fields.add(selected.group(1))
    return tuple(sorted(fields))
