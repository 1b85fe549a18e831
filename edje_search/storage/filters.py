"""The filter language of ``query --where`` / ``search(where=...)``, turned into SQL on the manifest.

Grammar (keywords in any letter case)::

    expr       := term ("or" term)*
    term       := factor ("and" factor)*
    factor     := "not" factor | "(" expr ")" | comparison
    comparison := FIELD op value | FIELD ["not"] "in" "(" value ("," value)* ")" | FIELD "glob" STRING
    op         := "=" | "==" | "!=" | "<" | "<=" | ">" | ">="
    value      := STRING ('...' or "...", backslash escapes the quote) | NUMBER

Date fields (``taken``, ``mtime``) compare with ISO strings: "2023-05-01" means that whole day
(``taken = "2023-05-01"`` is the day, ``taken <= "2023-05-01"`` includes it), "2023-05-01T14:30"
a moment. ``glob`` matches text fields with SQLite's GLOB (``*``, ``?``, ``[a-z]``; case-sensitive).

The parser is a hand-written recursive descent rather than Python's ``ast`` module: the grammar is
a dozen rules, and owning the tokenizer gives every error its exact column and keeps Python
syntax (attribute access, calls, ``==`` chains) out of the language by construction instead of
by a whitelist. Every value, and the JSON path of every user field, is a bound SQL parameter;
built-in fields are fixed expressions picked by name from a fixed table (:func:`meta_expr`), so
the SQL text is built only from the fragments below and nothing a user types is pasted into it.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import re
from typing import Callable, Sequence

from ..errors import BadQuery
from ..photo_meta import IMAGE_FIELDS

# Fields every row has, from the rows table's own columns: path (text), size in bytes, mtime
# (the file's modification time, compared with ISO dates in UTC). -1 marks "unknown" there.
COLUMN_FIELDS = {"path": ("text", "CAST(path AS TEXT)"), "size": ("number", "NULLIF(size, -1)"),
                 "mtime": ("date", "NULLIF(mtime_ns, -1)")}
OPS = {"=": "=", "==": "=", "!=": "!=", "<": "<", "<=": "<=", ">": ">", ">=": ">="}
KEYWORDS = {"and", "or", "not", "in", "glob"}
MAX_FILTER_CHARS = 4000
MAX_DEPTH = 50  # nested parentheses / not: far beyond any real filter, far below Python's recursion limit
MAX_PARAMS = 900  # bound parameters per filter, under SQLite's smallest compiled-in limit (999)

_TOKEN = re.compile(r"""\s*(?:(?P<num>-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)(?![A-Za-z_])
                      |(?P<name>[A-Za-z_][A-Za-z0-9_]*)
                      |(?P<str>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
                      |(?P<op>==|!=|<=|>=|=|<|>|\(|\)|,))""", re.VERBOSE)


class FilterError(BadQuery):
    """A filter that does not parse, names an unknown field or compares the wrong types."""


@dataclasses.dataclass(frozen=True)
class Tok:
    kind: str  # num, name, str, op, end
    text: str
    pos: int  # 1-based column
    value: object = None


def tokenize(text: str) -> list[Tok]:
    out, i = [], 0
    while i < len(text):
        if text[i:].strip() == "":
            break
        m = _TOKEN.match(text, i)
        if not m:
            j = len(text) - len(text[i:].lstrip())
            raise FilterError(f"unexpected character {text[j]!r} at position {j + 1}")
        kind = m.lastgroup
        raw = m.group(kind)
        pos = m.start(kind) + 1
        if kind == "num":
            value = float(raw) if any(c in raw for c in ".eE") else int(raw)
        elif kind == "str":
            value = re.sub(r"\\(.)", r"\1", raw[1:-1])
        else:
            value = raw
        if kind == "name" and raw.lower() in KEYWORDS:
            kind, value = "kw", raw.lower()
        out.append(Tok(kind, raw, pos, value))
        i = m.end()
    out.append(Tok("end", "", len(text) + 1))
    return out


# --------------------------------------------------------------------------------- syntax tree
@dataclasses.dataclass(frozen=True)
class Cmp:
    field: Tok
    op: str  # one of OPS' values, "in", "not in", "glob"
    values: tuple[Tok, ...]


@dataclasses.dataclass(frozen=True)
class BoolOp:
    op: str  # "and", "or", "not"
    parts: tuple


class _Parser:
    def __init__(self, text: str):
        self.toks = tokenize(text)
        self.i = 0
        self.depth = 0

    def peek(self) -> Tok:
        return self.toks[self.i]

    def take(self) -> Tok:
        tok = self.toks[self.i]
        self.i += 1
        return tok

    def fail(self, tok: Tok, wanted: str):
        got = "the end of the filter" if tok.kind == "end" else repr(tok.text)
        raise FilterError(f"expected {wanted} at position {tok.pos}, found {got}")

    def is_kw(self, word: str) -> bool:
        return self.peek().kind == "kw" and self.peek().value == word

    def parse(self):
        node = self.expr()
        if self.peek().kind != "end":
            self.fail(self.peek(), '"and", "or" or the end')
        return node

    def expr(self):
        parts = [self.term()]
        while self.is_kw("or"):
            self.take()
            parts.append(self.term())
        return parts[0] if len(parts) == 1 else BoolOp("or", tuple(parts))

    def term(self):
        parts = [self.factor()]
        while self.is_kw("and"):
            self.take()
            parts.append(self.factor())
        return parts[0] if len(parts) == 1 else BoolOp("and", tuple(parts))

    def factor(self):
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise FilterError(f"filter nested more than {MAX_DEPTH} deep at position {self.peek().pos}")
        try:
            return self._factor()
        finally:
            self.depth -= 1

    def _factor(self):
        if self.is_kw("not"):
            self.take()
            return BoolOp("not", (self.factor(),))
        if self.peek().text == "(":
            self.take()
            node = self.expr()
            if self.peek().text != ")":
                self.fail(self.peek(), '")"')
            self.take()
            return node
        field = self.take()
        if field.kind != "name":
            self.fail(field, "a field name, \"not\" or \"(\"")
        tok = self.take()
        if tok.kind == "op" and tok.text in OPS:
            return Cmp(field, OPS[tok.text], (self.value(),))
        if tok.kind == "kw" and tok.value == "glob":
            pattern = self.take()
            if pattern.kind != "str":
                self.fail(pattern, "a quoted glob pattern")
            return Cmp(field, "glob", (pattern,))
        negated = tok.kind == "kw" and tok.value == "not"
        if negated:
            tok = self.take()
        if tok.kind == "kw" and tok.value == "in":
            return Cmp(field, "not in" if negated else "in", self.value_list())
        self.fail(tok, "a comparison (=, !=, <, <=, >, >=, in, glob)")

    def value(self) -> Tok:
        tok = self.take()
        if tok.kind not in ("str", "num"):
            self.fail(tok, "a value (a quoted string or a number)")
        return tok

    def value_list(self) -> tuple[Tok, ...]:
        if self.take().text != "(":
            self.fail(self.toks[self.i - 1], '"(" after in')
        values = [self.value()]
        while self.peek().text == ",":
            self.take()
            values.append(self.value())
        if self.peek().text != ")":
            self.fail(self.peek(), '"," or ")"')
        self.take()
        return tuple(values)


def parse(text: str):
    """Parse a filter into its syntax tree (FilterError with the position on failure)."""
    if len(text) > MAX_FILTER_CHARS:
        raise FilterError(f"filter too long ({len(text)} characters; the limit is {MAX_FILTER_CHARS})")
    if not text.strip():
        raise FilterError("empty filter")
    return _Parser(text).parse()


# --------------------------------------------------------------------------------- SQL
def _iso_bounds(tok: Tok) -> tuple[dt.datetime, dt.datetime]:
    """An ISO date or date-time literal -> [start, end) of the span it names (a day, a minute...)."""
    text = str(tok.value).strip()
    try:
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
            start = dt.datetime.fromisoformat(text)
            return start, start + dt.timedelta(days=1)
        start = dt.datetime.fromisoformat(text).replace(tzinfo=None)
    except ValueError:
        raise FilterError(f"{tok.text} at position {tok.pos} is not an ISO date (YYYY-MM-DD or "
                          f"YYYY-MM-DDTHH:MM[:SS])") from None
    step = dt.timedelta(minutes=1) if len(text) <= 16 else dt.timedelta(seconds=1)
    return start, start + step


def _date_param(field: str, when: dt.datetime):
    if field == "mtime":  # nanoseconds since the epoch, the literal read as UTC
        return int(when.replace(tzinfo=dt.timezone.utc).timestamp()) * 1_000_000_000
    return when.strftime("%Y-%m-%dT%H:%M:%S")


# Fields with an expression index in the manifest (storage/filtered_search.ensure_field_indexes):
# the dates, cameras, folders and places people filter by
INDEXED_FIELDS = ("taken", "make", "folder", "lat")


def meta_expr(name: str) -> str:
    """SQL for a field of IMAGE_FIELDS. Only for those fixed names: the index on the expression
    is found only when the query spells it the same way, which a bound path would not."""
    if name not in IMAGE_FIELDS:
        raise KeyError(name)
    return f"json_extract(meta, '$.{name}')"


@dataclasses.dataclass
class FieldInfo:
    kind: str  # text, number, date, any (user fields: compared as stored)
    sql: str
    params: tuple = ()


class Compiler:
    """Syntax tree -> (SQL condition, bound parameters). ``user_field(name)`` says whether rows carry
    a user field of that name; ``describe_fields()`` lists every field for error messages."""

    def __init__(self, user_field: Callable[[str], bool], describe_fields: Callable[[], str]):
        self.user_field = user_field
        self.describe_fields = describe_fields
        self.params: list = []

    def field(self, tok: Tok) -> FieldInfo:
        name = tok.value
        if name in COLUMN_FIELDS:
            kind, sql = COLUMN_FIELDS[name]
            return FieldInfo(kind, sql)
        if name in IMAGE_FIELDS:  # a fixed name from IMAGE_FIELDS, so the expression can use an index
            return FieldInfo(IMAGE_FIELDS[name], meta_expr(name))
        if self.user_field(name):  # a name the user typed: its JSON path is a bound parameter
            return FieldInfo("any", "json_extract(meta, ?)", (f'$."{name}"',))
        raise FilterError(f"unknown field {name!r} at position {tok.pos}")

    def check(self, f: FieldInfo, field: Tok, value: Tok) -> None:
        wrong = (f.kind == "number" and value.kind != "num") or (f.kind in ("text", "date") and value.kind != "str")
        if wrong:
            want = {"number": "a number", "text": "a quoted string", "date": 'a quoted ISO date ("2023-05-01")'}
            raise FilterError(f"{field.value} is compared with {value.text} at position {value.pos}, but "
                              f"{field.value} takes {want[f.kind]}")

    def compare(self, f: FieldInfo, field: Tok, op: str, value: Tok) -> str:
        self.check(f, field, value)
        if f.kind != "date":
            self.params += [*f.params, value.value]
            return f"{f.sql} {op} ?"
        lo, hi = _iso_bounds(value)
        a, b = _date_param(field.value, lo), _date_param(field.value, hi)
        # a date names a span [lo, hi): "=" is inside it, "<=" anything before its end, and so on
        if op == "=":
            self.params += [*f.params, a, *f.params, b]
            return f"({f.sql} >= ? AND {f.sql} < ?)"
        if op == "!=":
            self.params += [*f.params, a, *f.params, b]
            return f"({f.sql} < ? OR {f.sql} >= ?)"
        bound, sql_op = {"<": (a, "<"), "<=": (b, "<"), ">": (b, ">="), ">=": (a, ">=")}[op]
        self.params += [*f.params, bound]
        return f"{f.sql} {sql_op} ?"

    def compile(self, node) -> str:
        if isinstance(node, BoolOp):
            if node.op == "not":
                return f"(NOT COALESCE({self.compile(node.parts[0])}, 0))"
            return "(" + f" {node.op.upper()} ".join(self.compile(p) for p in node.parts) + ")"
        f = self.field(node.field)
        if node.op == "glob":
            if f.kind not in ("text", "any"):
                raise FilterError(f"glob at position {node.values[0].pos} needs a text field; "
                                  f"{node.field.value} is a {f.kind}")
            self.params += [*f.params, node.values[0].value]
            return f"{f.sql} GLOB ?"
        if node.op in ("in", "not in"):
            inner = " OR ".join(self.compare(f, node.field, "=", v) for v in node.values)
            return f"(NOT COALESCE(({inner}), 0))" if node.op == "not in" else f"({inner})"
        return self.compare(f, node.field, node.op, node.values[0])


def compile_filter(text: str, user_field: Callable[[str], bool],
                   describe_fields: Callable[[], str]) -> tuple[str, list]:
    """A filter string -> (SQL condition on the rows table, its bound parameters)."""
    try:
        tree = parse(text)
        c = Compiler(user_field, describe_fields)
        sql = c.compile(tree)
        if len(c.params) > MAX_PARAMS:
            raise FilterError(f"filter too large ({len(c.params)} values and field names; the limit is {MAX_PARAMS})")
        return sql, c.params
    except FilterError as e:
        raise FilterError(f"bad filter: {e}; fields: {describe_fields()}") from None


def builtin_fields() -> Sequence[str]:
    return [*COLUMN_FIELDS, *IMAGE_FIELDS]
