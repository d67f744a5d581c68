"""Load rule files: YAML (ruamel, round-trip so every node keeps its line) -> pydantic -> :class:`RuleSet`.

Errors are collected, not thrown one at a time: :class:`RuleFileError` lists every problem as
``file:line:col: field: message``, with the nearest valid name for a typo
(``groups[0].rules[2].expr.spike.windw: unknown field (did you mean 'window'?)``).

ruamel's round-trip loader only builds plain mappings, sequences and scalars (it never
instantiates Python objects from tags), so loading an untrusted file is safe.
"""

from __future__ import annotations

import io
import os
import re
import types
import typing
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import MarkedYAMLError, YAMLError

from healthwatch.alerts.rules import LoadedRule, RuleFile, RuleSet, suggest

PACKS_PACKAGE = "healthwatch.alerts.packs"
MAX_FILE_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class Problem:
    """One problem in a rule file: where (file, 1-based line/col, dotted field) and what."""

    file: str
    line: int | None
    col: int | None
    field: str
    message: str

    def __str__(self) -> str:
        where = self.file
        if self.line is not None:
            where += f":{self.line}"
            if self.col is not None:
                where += f":{self.col}"
        return f"{where}: {self.field + ': ' if self.field else ''}{self.message}"


class RuleFileError(ValueError):
    """A rule file is invalid; ``problems`` lists each error with its file, line and field."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = list(problems)
        n = len(self.problems)
        head = f"{n} problem{'s' if n != 1 else ''} in rule file{'s' if len({p.file for p in problems}) > 1 else ''}"
        super().__init__(head + ":\n" + "\n".join(f"  {p}" for p in self.problems))


# ------------------------------------------------------------------------------------------
# YAML -> plain data, keeping the tree for line lookups


def _yaml() -> YAML:
    y = YAML(typ="rt")
    y.allow_duplicate_keys = False
    return y


#: Most values a rule file may expand to: YAML aliases can nest (``&a [*b, *b, …]``), and a
#: "billion laughs" file of a few hundred bytes would otherwise expand to 10^9 values.
MAX_NODES = 200_000


class _TooManyNodes(ValueError):
    """The document expands (through aliases) to more than ``MAX_NODES`` values."""


def plain(node: Any, _budget: list[int] | None = None) -> Any:
    """Round-trip nodes -> plain dict/list/str/int/float/bool/None (what pydantic expects).

    Raises ``ValueError`` when the document expands to more than ``MAX_NODES`` values.
    """
    budget = [MAX_NODES] if _budget is None else _budget
    budget[0] -= 1
    if budget[0] < 0:
        raise _TooManyNodes(f"rule file expands to more than {MAX_NODES:,} values (nested YAML aliases?)")
    if isinstance(node, dict):
        return {(plain(k, budget) if not isinstance(k, str) else str(k)): plain(v, budget) for k, v in node.items()}
    if isinstance(node, list):
        return [plain(v, budget) for v in node]
    if isinstance(node, bool) or node is None:
        return node
    if isinstance(node, str):
        return str(node)
    if isinstance(node, int):
        return int(node)
    if isinstance(node, float):
        return float(node)
    return node


def _locate(tree: Any, loc: Sequence[Any]) -> tuple[int | None, int | None]:
    """0-based (line, col) of the deepest node of ``loc`` that exists in the YAML tree."""
    node = tree
    line, col = (node.lc.line, node.lc.col) if hasattr(node, "lc") else (None, None)
    for part in loc:
        if isinstance(node, CommentedMap) and part in node:
            pos = node.lc.key(part)
            node = node[part]
        elif isinstance(node, CommentedSeq) and isinstance(part, int) and 0 <= part < len(node):
            pos = node.lc.item(part)
            node = node[part]
        else:
            break
        if pos:  # a tagged node (e.g. ``!!python/object/apply:…`` kept as data) may have no position
            line, col = pos
    return line, col


def _field_path(loc: Sequence[Any]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


# ------------------------------------------------------------------------------------------
# which model lives at a location (for "did you mean" on unknown keys)


def _models_in(annotation: Any) -> list[Any]:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return [m for a in typing.get_args(annotation) for m in _models_in(a)]
    return [annotation]


def _step(annotation: Any, part: Any) -> Any:
    """The annotation one ``loc`` element below ``annotation`` (None when unknown)."""
    for ann in _models_in(annotation):
        if isinstance(ann, type) and issubclass(ann, BaseModel) and isinstance(part, str):
            for name, field in ann.model_fields.items():
                if part in (name, field.alias):
                    return field.annotation
        origin = typing.get_origin(ann)
        args = typing.get_args(ann)
        if origin in (tuple, list) and isinstance(part, int) and args:
            return args[0]
        if origin is dict and args and isinstance(part, str):
            return args[1]
    return None


def _allowed_keys(loc: Sequence[Any], root: Any = RuleFile) -> list[str]:
    ann: Any = root
    for part in loc:
        ann = _step(ann, part)
        if ann is None:
            return []
    for m in _models_in(ann):
        if isinstance(m, type) and issubclass(m, BaseModel):
            return [f.alias or n for n, f in m.model_fields.items()]
    return []


def _message(err: dict[str, Any], root: Any = RuleFile) -> str:
    etype, msg, loc = err["type"], err["msg"], err["loc"]
    if etype == "extra_forbidden":
        allowed = _allowed_keys(loc[:-1], root)
        hint = suggest(str(loc[-1]), allowed) if allowed else ""
        valid = f"; valid here: {', '.join(allowed)}" if allowed else ""
        return f"unknown field {loc[-1]!r}{hint}{valid}"
    if etype == "missing":
        return f"missing required field {loc[-1]!r}" if loc else "missing required field"
    if etype == "literal_error":
        expected = re.findall(r"'([^']*)'", str(err.get("ctx", {}).get("expected", "")))
        return f"{msg}, got {err.get('input')!r}{suggest(str(err.get('input')), expected)}"
    if etype == "value_error":
        return msg.removeprefix("Value error, ")
    return msg


def problems_from(exc: ValidationError, tree: Any, source: str, root: Any = RuleFile) -> list[Problem]:
    """Pydantic errors -> :class:`Problem` list with YAML lines and "did you mean" hints."""
    out = []
    errors = exc.errors(include_url=False)
    deeper = [tuple(e["loc"]) for e in errors]
    for err in errors:
        loc = tuple(err["loc"])
        # A list that is "too short" only because one of its items failed is noise: the item's
        # own error says what is wrong.
        if err["type"] == "too_short" and any(len(d) > len(loc) and d[: len(loc)] == loc for d in deeper):
            continue
        # "missing" errors point at the parent mapping; everything else at the key itself.
        line, col = _locate(tree, loc)
        out.append(Problem(source, None if line is None else line + 1, None if col is None else col + 1,
                           _field_path(loc), _message(err, root)))
    return out


# ------------------------------------------------------------------------------------------
# public loading API


def parse_yaml(text: str, source: str) -> tuple[Any, list[Problem]]:
    """Parse YAML text into a round-trip tree (a mapping), or return the problems found."""
    try:
        tree = _yaml().load(io.StringIO(text))
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        col = mark.column + 1 if mark is not None else None
        what = " ".join(s for s in (exc.context, exc.problem) if s) or str(exc)
        return None, [Problem(source, line, col, "", f"YAML syntax: {what}")]
    except YAMLError as exc:
        return None, [Problem(source, None, None, "", f"YAML: {exc}")]
    if tree is None:
        return None, [Problem(source, 1, 1, "", "empty rule file (expected `groups:`)")]
    if not isinstance(tree, CommentedMap):
        return None, [Problem(source, 1, 1, "", "a rule file is a mapping with `groups:` at the top")]
    return tree, []


def parse_rule_file(text: str, source: str = "<string>") -> RuleFile:
    """Validate one rule file's text; raises :class:`RuleFileError` listing every problem."""
    tree, problems = parse_yaml(text, source)
    if problems:
        raise RuleFileError(problems)
    try:
        data = plain(tree)
    except _TooManyNodes as exc:
        raise RuleFileError([Problem(source, None, None, "", str(exc))]) from None
    extra = data.get("extra_scalars") if isinstance(data, dict) else None
    ctx = {"extra_scalars": tuple(str(x) for x in extra) if isinstance(extra, list) else ()}
    try:
        return RuleFile.model_validate(data, context=ctx)
    except ValidationError as exc:
        raise RuleFileError(problems_from(exc, tree, source)) from None


def _flatten(files: Iterable[tuple[RuleFile, str]]) -> RuleSet:
    rules: list[LoadedRule] = []
    sources: list[str] = []
    seen: dict[str, str] = {}
    problems: list[Problem] = []
    for rf, src in files:
        sources.append(src)
        for g in rf.groups:
            if g.name in seen:
                problems.append(Problem(src, None, None, "groups", f"group {g.name!r} is also defined in {seen[g.name]}"))
                continue
            seen[g.name] = src
            rules.extend(LoadedRule(group=g.name, rule=r, source=src) for r in g.rules)
    if problems:
        raise RuleFileError(problems)
    return RuleSet(rules=tuple(rules), sources=tuple(sources))


def load_text(text: str, source: str = "<string>") -> RuleSet:
    """Rules from YAML text (``source`` names it in errors)."""
    return _flatten([(parse_rule_file(text, source), source)])


def read_text(path: Path) -> str:
    """The file's text, or a :class:`RuleFileError` naming it (missing, unreadable, too large)."""
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise RuleFileError([Problem(str(path), None, None, "", f"file too large ({size} bytes)")])
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RuleFileError([Problem(str(path), None, None, "", "no such file")]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RuleFileError([Problem(str(path), None, None, "", f"cannot read: {exc}")]) from None


def pack_names() -> list[str]:
    """Names of the rule packs shipped in ``healthwatch.alerts.packs`` (without ``_test`` files)."""
    root = resources.files(PACKS_PACKAGE)
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml") and not p.name.endswith("_test.yaml"))


def pack_path(name: str = "default") -> Path:
    """Filesystem path of a shipped pack (``default`` -> ``.../packs/default.yaml``)."""
    res = resources.files(PACKS_PACKAGE) / f"{name}.yaml"
    if not res.is_file():
        raise RuleFileError([Problem(f"pack:{name}", None, None, "", f"no shipped rule pack {name!r}{suggest(name, pack_names())}")])
    return Path(str(res))


def load_pack(name: str = "default") -> RuleSet:
    """A shipped rule pack by name (``"default"``)."""
    return load_file(pack_path(name))


def load_file(path: str | os.PathLike[str]) -> RuleSet:
    """Rules from one YAML file."""
    p = Path(path)
    return _flatten([(parse_rule_file(read_text(p), str(p)), str(p))])


def load_rules(spec: Any) -> RuleSet:
    """Rules from anything a user may pass: a :class:`RuleSet`, ``"default"`` (or another pack name
    given as ``pack:<name>``), a path, or a list of those. Every file is validated before any
    error is raised, so one :class:`RuleFileError` lists the problems of all of them."""
    if isinstance(spec, RuleSet):
        return spec
    items = list(spec) if isinstance(spec, (list, tuple)) else [spec]
    if not items:
        raise RuleFileError([Problem("<rules>", None, None, "", "no rule files given")])
    files: list[tuple[RuleFile, str]] = []
    extra: list[LoadedRule] = []
    problems: list[Problem] = []
    for item in items:
        if isinstance(item, RuleSet):
            extra.extend(item.rules)
            continue
        if isinstance(item, str) and (item == "default" or item.startswith("pack:")):
            path = pack_path(item.removeprefix("pack:"))
        else:
            path = Path(item)
        try:
            files.append((parse_rule_file(read_text(path), str(path)), str(path)))
        except RuleFileError as exc:
            problems.extend(exc.problems)
    if problems:
        raise RuleFileError(problems)
    flat = _flatten(files)
    if extra:
        flat = _flatten_sets([flat, RuleSet(rules=tuple(extra))])
    return flat


def _flatten_sets(sets: Sequence[RuleSet]) -> RuleSet:
    rules = tuple(r for s in sets for r in s.rules)
    names = [(r.group, r.rule.alert) for r in rules]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        g, a = sorted(dup)[0]
        raise RuleFileError([Problem("<rules>", None, None, "", f"rule {g}/{a} is defined twice")])
    return RuleSet(rules=rules, sources=tuple(s for x in sets for s in x.sources))
