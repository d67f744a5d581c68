"""Security properties (DESIGN §7, §6): loopback binding, parameterised SQL, inert templates,
redacted notification URLs.

* ``healthwatch app`` listens on 127.0.0.1 only unless ``--host`` says otherwise (checked on
  the live server's listening sockets with psutil);
* no module under ``app/`` (nor ``healthwatch/query.py``) builds SQL text from user input: a
  static data-flow check over the AST proves that the first argument of every ``.sql(`` /
  ``.execute(`` call is built only from constants, lookups in constant tables, numbers and
  the SQL of helper functions that are themselves built that way; user values travel as
  parameters;
* alert annotation templates can only read the transition's fields: attribute access, format-spec
  tricks and values that look like templates never evaluate anything;
* notification URLs are masked in logs, including the logs of a real failing apprise send.
"""

from __future__ import annotations

import ast
import http.server
import logging
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
from reliability_helpers import REPO, child_env, free_port, hw_command, wait_for

from healthwatch.alerts import AppriseSink, RuleFileError, Transition, load_text, redact_url
from healthwatch.alerts.template import check_template, render

# --------------------------------------------------------------------------------------------
# the app binds loopback


def _listening(pid: int, port: int) -> list[str]:
    """Addresses on which ``pid`` or one of its children listens on TCP ``port``."""
    procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    out = []
    for p in procs:
        try:
            conns = p.net_connections(kind="tcp") if hasattr(p, "net_connections") else p.connections(kind="tcp")
        except psutil.Error:
            continue
        out += [c.laddr.ip for c in conns if c.status == psutil.CONN_LISTEN and c.laddr.port == port]
    return out


@pytest.mark.slow
def test_app_listens_on_loopback_only(tmp_path: Path) -> None:
    """The real server started by ``healthwatch app`` listens on 127.0.0.1 and nowhere else."""
    port = free_port()
    log = open(tmp_path / "app.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(hw_command("app", "--store", str(tmp_path / "store"), "--port", str(port)),
                            stdout=log, stderr=subprocess.STDOUT, env=child_env())
    try:
        def healthy() -> bool:
            assert proc.poll() is None, (tmp_path / "app.log").read_text()
            try:
                return urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2).status == 200
            except OSError:
                return False

        wait_for(healthy, 90, "the app server's health endpoint", every=0.2)
        addrs = _listening(proc.pid, port)
        assert addrs and set(addrs) == {"127.0.0.1"}, addrs
        # Every non-loopback address of this machine refuses the port.
        for _name, nics in psutil.net_if_addrs().items():
            for a in nics:
                if a.family.name == "AF_INET" and not a.address.startswith("127."):
                    with pytest.raises(OSError):
                        urllib.request.urlopen(f"http://{a.address}:{port}/_stcore/health", timeout=2)
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def test_app_host_is_loopback_by_default_and_only_changed_when_asked() -> None:
    """``streamlit_command`` and the CLI default: 127.0.0.1; ``--host`` is passed through as given."""
    from healthwatch.app.launch import streamlit_command

    cmd = streamlit_command(Path("s"), 8600)
    assert cmd[cmd.index("--server.address") + 1] == "127.0.0.1"
    cmd = streamlit_command(Path("s"), 8600, host="10.1.2.3")
    assert cmd[cmd.index("--server.address") + 1] == "10.1.2.3"
    res = subprocess.run(hw_command("app", "--help"), capture_output=True, text=True, timeout=60, env=child_env())
    assert res.returncode == 0 and "127.0.0.1" in res.stdout


# --------------------------------------------------------------------------------------------
# static check: SQL text is never built from user input

SQL_MODULES = sorted(p for p in (REPO / "app").rglob("*.py")) + sorted((REPO / "healthwatch" / "query").rglob("*.py"))
SQL_METHODS = {"sql", "execute"}
#: Builtins whose result cannot carry text into SQL (numbers, booleans).
NUMERIC_CALLS = {"int", "float", "len", "bool", "round", "abs", "hash"}
#: Builtins / str methods that return text made only of their (safe) inputs.
PURE_CALLS = {"min", "max", "sum", "sorted", "tuple", "list", "set", "reversed", "str", "enumerate", "zip"}
STR_METHODS = {"join", "replace", "format", "lower", "upper", "strip", "lstrip", "rstrip"}
#: Modules whose functions only return numbers.
NUMERIC_MODULES = {"math"}
#: Arithmetic that only yields numbers (``%`` and ``+`` and ``*`` can build text: checked operands).
NUMERIC_OPS = (ast.Sub, ast.Div, ast.FloorDiv, ast.Pow, ast.BitAnd, ast.BitOr, ast.BitXor, ast.LShift, ast.RShift)
#: app/data.py's caching dispatchers, which call another function with the caller's arguments:
#: name -> (position of the function or its name, number of leading parameters of the target the
#: dispatcher fills itself, position of a tuple literal packing the arguments or None: they follow).
DISPATCHERS = {"cached_run": (2, 2, None), "cached": (1, 1, None), "_cached": (0, 1, 3)}


@dataclass
class Module:
    """One parsed module and its indexes."""

    path: Path
    tree: ast.Module
    parents: dict[ast.AST, ast.AST] = field(default_factory=dict)
    defs: dict[str, list[ast.FunctionDef]] = field(default_factory=dict)
    module_assign: dict[str, list[ast.expr]] = field(default_factory=dict)
    imports: dict[str, tuple[str, str | None]] = field(default_factory=dict)  # local -> (module, name)


def _load(path: Path) -> Module:
    tree = ast.parse(path.read_text(), str(path))
    m = Module(path, tree)
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            m.parents[child] = node
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            m.defs.setdefault(node.name, []).append(node)  # type: ignore[arg-type]
    for stmt in tree.body:
        if isinstance(stmt, ast.Assign):
            for t in stmt.targets:
                if isinstance(t, ast.Name):
                    m.module_assign.setdefault(t.id, []).append(stmt.value)
        elif isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and stmt.value is not None:
            m.module_assign.setdefault(stmt.target.id, []).append(stmt.value)
        elif isinstance(stmt, ast.ImportFrom) and stmt.module:
            for a in stmt.names:
                m.imports[a.asname or a.name] = (stmt.module, a.name)
        elif isinstance(stmt, ast.Import):
            for a in stmt.names:
                m.imports[a.asname or a.name] = (a.name, None)
    return m


class SqlTaint:
    """Decides whether an expression's value can only be text made of constants (see module doc)."""

    def __init__(self, modules: list[Path]) -> None:
        self.modules = {p: _load(p) for p in modules}
        self._extra: dict[str, Module] = {}
        self._memo: dict[tuple[int, str], bool] = {}
        self._busy: set[tuple[int, str]] = set()
        self.why: list[str] = []

    # -- resolution helpers -----------------------------------------------------------------
    def _module_of(self, name: str) -> Module | None:
        """A healthwatch module by dotted name (``healthwatch.store`` -> healthwatch/store.py)."""
        if not name.startswith("healthwatch"):
            return None
        rel = name.split(".")[1:]
        candidates = [REPO / "healthwatch" / Path(*rel).with_suffix(".py")] if rel else []
        if rel and rel[0] in ("app", "alerts", "hooks"):  # packages mapped from top-level folders
            candidates.append(REPO / rel[0] / Path(*rel[1:]).with_suffix(".py") if rel[1:] else REPO / rel[0] / "__init__.py")
        for c in candidates:
            if c.exists():
                if c in self.modules:
                    return self.modules[c]
                return self._extra.setdefault(str(c), _load(c))
        return None

    def _enclosing(self, m: Module, node: ast.AST) -> ast.FunctionDef | None:
        cur = m.parents.get(node)
        while cur is not None and not isinstance(cur, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            cur = m.parents.get(cur)
        return cur  # type: ignore[return-value]

    def _comprehension_iter(self, m: Module, node: ast.Name) -> ast.expr | None:
        """The iterable a comprehension variable ``node`` comes from, if it is one."""
        cur = m.parents.get(node)
        while cur is not None and not isinstance(cur, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Module)):
            if isinstance(cur, (ast.ListComp, ast.SetComp, ast.GeneratorExp, ast.DictComp)):
                for gen in cur.generators:
                    if any(isinstance(t, ast.Name) and t.id == node.id for t in ast.walk(gen.target)):
                        return gen.iter
            cur = m.parents.get(cur)
        return None

    # -- the analysis -----------------------------------------------------------------------
    def safe(self, m: Module, e: ast.AST | None) -> bool:
        """True when ``e`` (in module ``m``) can only hold constant-built text or numbers."""
        if e is None:
            return True
        key = (id(e), "v")
        if key in self._memo:
            return self._memo[key]
        if key in self._busy:  # a cycle (``sql += …`` in a loop): optimistic, decided by the other paths
            return True
        self._busy.add(key)
        try:
            ok = self._safe(m, e)
        finally:
            self._busy.discard(key)
        self._memo[key] = ok
        if not ok:
            self.why.append(f"{m.path.name}:{getattr(e, 'lineno', '?')}: {ast.unparse(e)[:120]}")
        return ok

    def _safe(self, m: Module, e: ast.AST) -> bool:
        if isinstance(e, ast.Constant):
            return True
        if isinstance(e, ast.JoinedStr):
            return all(self.safe(m, v) for v in e.values)
        if isinstance(e, ast.FormattedValue):
            return self.safe(m, e.value) and self.safe(m, e.format_spec)
        if isinstance(e, ast.BinOp):
            return isinstance(e.op, NUMERIC_OPS) or (self.safe(m, e.left) and self.safe(m, e.right))
        if isinstance(e, ast.BoolOp):
            return all(self.safe(m, v) for v in e.values)
        if isinstance(e, ast.UnaryOp):
            return self.safe(m, e.operand)
        if isinstance(e, ast.Compare):
            return True  # a bool
        if isinstance(e, ast.IfExp):
            return self.safe(m, e.body) and self.safe(m, e.orelse)
        if isinstance(e, (ast.Tuple, ast.List, ast.Set)):
            return all(self.safe(m, x) for x in e.elts)
        if isinstance(e, ast.Dict):
            return all(self.safe(m, v) for v in e.values) and all(self.safe(m, k) for k in e.keys if k is not None)
        if isinstance(e, (ast.ListComp, ast.SetComp, ast.GeneratorExp)):
            return self.safe(m, e.elt)
        if isinstance(e, ast.Starred):
            return self.safe(m, e.value)
        if isinstance(e, ast.Subscript):
            # An element of a constant table (e.g. ``_AGG_SQL[agg]``): whatever the key, the value
            # is one of the table's constants (or a KeyError).
            return self.safe(m, e.value)
        if isinstance(e, ast.Call):
            return self._safe_call(m, e)
        if isinstance(e, ast.Name):
            return self._safe_name(m, e)
        if isinstance(e, ast.Attribute):
            base = e.value
            if isinstance(base, ast.Name) and base.id in m.imports:
                mod_name, name = m.imports[base.id]
                target = self._module_of(mod_name if name is None else f"{mod_name}.{name}")
                if target is not None and e.attr in target.module_assign:
                    return all(self.safe(target, v) for v in target.module_assign[e.attr])
            return False
        return False

    def _returns_safe(self, m: Module, name: str, index: int | None = None) -> bool:
        """Whether every function ``name`` of ``m`` returns safe text (element ``index`` of a tuple)."""
        defs = m.defs.get(name)
        if not defs:
            return False
        for d in defs:
            returns = [n for n in ast.walk(d) if isinstance(n, ast.Return) and self._enclosing(m, n) is d]
            if not returns:
                return False
            for r in returns:
                if not self.safe_element(m, r.value, index):
                    return False
        return True

    def safe_element(self, m: Module, e: ast.expr | None, index: int | None) -> bool:
        """Whether element ``index`` of ``e`` (all of ``e`` when None) is safe."""
        if index is None or e is None:
            return self.safe(m, e)
        if isinstance(e, ast.Tuple) and len(e.elts) > index:
            return self.safe(m, e.elts[index])
        if isinstance(e, ast.IfExp):
            return self.safe_element(m, e.body, index) and self.safe_element(m, e.orelse, index)
        if isinstance(e, ast.Call):
            fname = e.func.id if isinstance(e.func, ast.Name) else e.func.attr if isinstance(e.func, ast.Attribute) else None
            if fname is not None and fname in m.defs:
                return self._returns_safe(m, fname, index)
        return self.safe(m, e)

    def _safe_call(self, m: Module, e: ast.Call) -> bool:
        func = e.func
        args = [*e.args, *(k.value for k in e.keywords)]
        if isinstance(func, ast.Name):
            if func.id in NUMERIC_CALLS:
                return True
            if func.id in PURE_CALLS:
                return all(self.safe(m, a) for a in args)
            if func.id in m.defs:
                return self._returns_safe(m, func.id)
            if func.id in m.imports:
                mod_name, name = m.imports[func.id]
                target = self._module_of(mod_name)
                return target is not None and name is not None and self._returns_safe(target, name)
            return False
        if isinstance(func, ast.Attribute):
            if isinstance(func.value, ast.Name) and func.value.id in NUMERIC_MODULES:
                return True
            if func.attr in STR_METHODS:
                return self.safe(m, func.value) and all(self.safe(m, a) for a in args)
            if func.attr in m.defs:  # a method of a class of this module
                return self._returns_safe(m, func.attr)
            # Methods of the read path's own classes (Timeline.predicate, rollup predicates, ...): the
            # method must itself return safe text, checked the same way.
            for folder in ("store", "query"):
                for py in sorted((REPO / "healthwatch" / folder).glob("*.py")):
                    other = self._module_of(f"healthwatch.{folder}.{py.stem}")
                    if other is not None and other is not m and func.attr in other.defs:
                        return self._returns_safe(other, func.attr)
        return False

    def _safe_name(self, m: Module, e: ast.Name) -> bool:
        it = self._comprehension_iter(m, e)
        if it is not None:
            return self.safe(m, it)
        fn = self._enclosing(m, e)
        while fn is not None:
            bound = self._bindings(m, fn, e.id)
            if bound is not None:
                return bound
            fn = self._enclosing(m, fn)
        if e.id in m.module_assign:
            return all(self.safe(m, v) for v in m.module_assign[e.id])
        if e.id in m.imports:
            mod_name, name = m.imports[e.id]
            target = self._module_of(mod_name)
            if target is not None and name in target.module_assign:
                return all(self.safe(target, v) for v in target.module_assign[name])
        return False

    def _bindings(self, m: Module, fn: ast.AST, name: str) -> bool | None:
        """Safety of ``name`` bound in function ``fn`` (None: not bound there)."""
        results: list[bool] = []
        assert isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        params = [a.arg for a in (*fn.args.posonlyargs, *fn.args.args, *fn.args.kwonlyargs)]
        if name in params:
            if isinstance(fn, ast.Lambda):
                return False
            results.append(self._param_safe(m, fn, name))
        for node in ast.walk(fn):
            if self._enclosing(m, node) is not fn and node is not fn:
                continue
            if isinstance(node, ast.Assign):
                for t in node.targets:
                    results += self._target_safety(m, t, node.value, name)
            elif isinstance(node, ast.AnnAssign) and node.value is not None:
                results += self._target_safety(m, node.target, node.value, name)
            elif isinstance(node, ast.AugAssign) and isinstance(node.target, ast.Name) and node.target.id == name:
                results.append(self.safe(m, node.value))
            elif isinstance(node, (ast.For, ast.AsyncFor)):
                t = node.target
                if isinstance(t, ast.Tuple) and isinstance(node.iter, (ast.Tuple, ast.List)) and any(
                        isinstance(x, ast.Name) and x.id == name for x in t.elts):
                    # ``for table, names, col in (("scalars", …, "name"), …)``: only that column counts
                    i = next(i for i, x in enumerate(t.elts) if isinstance(x, ast.Name) and x.id == name)
                    results += [self.safe_element(m, row, i) for row in node.iter.elts]
                elif (isinstance(t, ast.Tuple) and isinstance(node.iter, ast.Call) and isinstance(node.iter.func, ast.Name)
                      and node.iter.func.id == "zip" and not node.iter.keywords and len(node.iter.args) == len(t.elts)
                      and any(isinstance(x, ast.Name) and x.id == name for x in t.elts)):
                    # ``for cond, params in zip(conds, values)``: ``cond`` only ever holds items of ``conds``
                    i = next(i for i, x in enumerate(t.elts) if isinstance(x, ast.Name) and x.id == name)
                    results.append(self.safe(m, node.iter.args[i]))
                elif any(isinstance(x, ast.Name) and x.id == name for x in ast.walk(t)):
                    results.append(self.safe(m, node.iter))
            elif isinstance(node, (ast.With, ast.AsyncWith)):
                for item in node.items:
                    if item.optional_vars is not None and any(
                            isinstance(t, ast.Name) and t.id == name for t in ast.walk(item.optional_vars)):
                        results.append(False)
        if not results:
            return None
        return all(results)

    def _target_safety(self, m: Module, target: ast.expr, value: ast.expr, name: str) -> list[bool]:
        if isinstance(target, ast.Name):
            return [self.safe(m, value)] if target.id == name else []
        if isinstance(target, (ast.Tuple, ast.List)):
            out = []
            for i, t in enumerate(target.elts):
                if isinstance(t, ast.Name) and t.id == name:
                    out.append(self.safe_element(m, value, i))
                elif isinstance(t, (ast.Tuple, ast.List)):
                    out += [False] if any(isinstance(x, ast.Name) and x.id == name for x in ast.walk(t)) else []
            return out
        return []

    def _param_safe(self, m: Module, fn: ast.FunctionDef, name: str) -> bool:
        """A parameter is safe when every call of the function (direct or through a dispatcher)
        passes a safe value, or it is never passed and its default is safe."""
        params = [a.arg for a in (*fn.args.posonlyargs, *fn.args.args)]
        is_method = bool(params) and params[0] in ("self", "cls")
        pos = params.index(name) if name in params else None
        defaults = dict(zip(params[len(params) - len(fn.args.defaults):], fn.args.defaults))
        defaults.update({a.arg: d for a, d in zip(fn.args.kwonlyargs, fn.args.kw_defaults) if d is not None})
        calls = 0
        for mod in [*self.modules.values(), *self._extra.values()]:
            for node in ast.walk(mod.tree):
                if not isinstance(node, ast.Call):
                    continue
                f = node.func
                fname = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
                passed: ast.expr | None = None
                matched = False
                if fname == fn.name:
                    matched = True
                    offset = 1 if is_method and isinstance(f, ast.Attribute) else 0
                    if pos is not None and pos - offset < len(node.args) and pos - offset >= 0:
                        passed = node.args[pos - offset]
                    passed = next((k.value for k in node.keywords if k.arg == name), passed)
                    if any(isinstance(a, ast.Starred) for a in node.args) and passed is None:
                        return False
                elif fname in DISPATCHERS:
                    at, lead, packed = DISPATCHERS[fname]
                    if len(node.args) > at:
                        target = node.args[at]
                        if (isinstance(target, ast.Name) and target.id == fn.name) or (
                                isinstance(target, ast.Constant) and target.value == fn.name):
                            matched = True
                            extra = node.args[at + 1:]
                            if packed is not None:
                                pack = node.args[packed] if len(node.args) > packed else None
                                if not isinstance(pack, ast.Tuple):
                                    return False  # arguments the check cannot see
                                extra = pack.elts
                            if pos is not None and pos >= lead and pos - lead < len(extra):
                                passed = extra[pos - lead]
                            passed = next((k.value for k in node.keywords if k.arg == name), passed)
                if not matched:
                    continue
                calls += 1
                if passed is None:
                    if name not in defaults or not self.safe(m, defaults[name]):
                        return False
                elif not self.safe(mod, passed):
                    return False
        return calls > 0


def _sql_calls(modules: dict[Path, Module]) -> Iterator[tuple[Module, ast.Call]]:
    for m in modules.values():
        for node in ast.walk(m.tree):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in SQL_METHODS and node.args):
                yield m, node


def test_no_sql_text_is_built_from_user_input() -> None:
    """Every ``.sql(``/``.execute(`` call in app/ and healthwatch/query.py: first argument safe."""
    taint = SqlTaint(SQL_MODULES)
    calls = 0
    unsafe: list[str] = []
    for m, node in list(_sql_calls(taint.modules)):
        calls += 1
        taint.why.clear()
        if not taint.safe(m, node.args[0]):
            unsafe.append(f"{m.path.relative_to(REPO)}:{node.lineno}: {ast.unparse(node.args[0])[:100]}\n    because "
                          + "\n    ".join(taint.why[:4]))
    print(f"SQL call sites checked: {calls} in {len(SQL_MODULES)} modules")  # the count RELIABILITY.md refers to
    assert calls >= 30, f"found only {calls} SQL calls: the check is looking at the wrong code"
    assert not unsafe, "SQL text built from non-constant input:\n" + "\n".join(unsafe)


def test_the_sql_check_catches_injection() -> None:
    """The checker is not vacuous: the usual ways of pasting user text into SQL are all caught."""
    bad = '''
import streamlit as st
TABLES = {"a": "scalars"}
def page(store, run, metric: str, table, n: int):
    store.sql(f"SELECT * FROM scalars WHERE run = '{run}'")
    store.sql("SELECT * FROM scalars WHERE name = '" + metric + "'")
    store.sql("SELECT * FROM %s" % table)
    q = "SELECT " + st.text_input("cols")
    store.sql(q)
    store.sql("SELECT * FROM {}".format(run))
    store.con.execute(" ".join(["SELECT", metric]))
    store.sql(f"SELECT * FROM {TABLES[table]} LIMIT {int(n)}")  # safe: a constant table, a number
def helper(x):
    return f"WHERE name = '{x}'"
def caller(store, user):
    store.sql("SELECT * FROM scalars " + helper(user))
def zipped(store, user: str, n: int):
    for cond, value in zip([" AND step > ?"], [user]):
        store.sql("SELECT * FROM scalars WHERE true" + cond, [value])  # safe: cond from the constant list
def zipped_user(store, user: str, n: int):
    for value, cond in zip([n], [user]):
        store.sql("SELECT * FROM scalars WHERE true" + cond)  # unsafe: cond from the user's list
'''
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "bad.py"
        path.write_text(bad)
        taint = SqlTaint([path])
        m = taint.modules[path]
        verdicts = [taint.safe(m, n.args[0]) for n in ast.walk(m.tree)
                    if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr in SQL_METHODS]
    assert verdicts == [False, False, False, False, False, False, True, False, True, False], verdicts


# --------------------------------------------------------------------------------------------
# annotation templates


TRICKS = [
    "{{ run.__class__ }}", "{{ value.__class__.__mro__ }}", "{{ __import__ }}", "{{ run.upper }}",
    "{{ value:{0.__class__} }}", "{{ value:>999999999 }}", "{{ value:%s }}", "{{ step:0999999999d }}",
    "{{ run }}{{", "{% for x in y %}{{ x }}{% endfor %}", "{{ run | attr('__class__') }}", "{{ ''.join(run) }}",
]


@pytest.mark.parametrize("text", TRICKS)
def test_template_tricks_are_refused_when_the_rule_loads(text: str) -> None:
    """A rule file with such an annotation is a RuleFileError naming the field."""
    with pytest.raises(ValueError):
        check_template(text)
    yaml = ("groups:\n- name: g\n  rules:\n  - alert: A\n    expr: {threshold: {metric: loss/train, above: 1}}\n"
            f"    annotations: {{summary: {text!r}}}\n")
    with pytest.raises(RuleFileError, match="annotations"):
        load_text(yaml, "tricks.yaml")


def test_render_never_evaluates_anything() -> None:
    """Even unchecked text: attribute paths render as ``-``, values are never re-rendered, no
    str.format/Jinja syntax is interpreted, and a huge width cannot make a huge string."""
    values = {"run": "{{ step }}{0.__class__}", "step": 7, "value": 1.5}
    labels = {"x": "{{ value }}"}
    # Attribute paths are never followed: they render as a note that the name is unknown (summaries
    # say what is missing instead of printing "-").
    assert render("{{ run.__class__ }}", values, labels) == "run.__class__ unknown"
    assert render("{{ value.__class__.__mro__ }}", values, labels) == "value.__class__.__mro__ unknown"
    assert render("{{ labels.__init__ }}", values, labels) == "no label __init__"  # a key lookup, not getattr
    assert render("{{ run }}", values, labels) == "{{ step }}{0.__class__}"  # one pass only
    assert render("{{ labels.x }}", values, labels) == "{{ value }}"
    assert render("{value.__class__} {0} %(run)s {% if 1 %}", values, labels) == "{value.__class__} {0} %(run)s {% if 1 %}"
    assert len(render("{{ value:>99999999999999999999 }}", values, labels)) < 100


# --------------------------------------------------------------------------------------------
# notification URLs

SECRET = "s3cr3tT0kenXYZ"
URLS = [
    f"json://user:{SECRET}@127.0.0.1:9/hook",
    f"jsons://hooks.example.com/path?token={SECRET}",
    f"slack://T1JJ3T3L2/A1BRTD4JD/{SECRET}/#general",
    f"https://hooks.slack.com/services/T00000000/B00000000/{SECRET}",
    f"mailto://alerts:{SECRET}@gmail.com",
    f"discord://4174216298/{SECRET}",
    f"tgram://123456789:{SECRET}/-100123",
    f"unknownscheme://user:{SECRET}@host/{SECRET}?key={SECRET}",
]


@pytest.mark.parametrize("url", URLS, ids=lambda u: u.split(":", 1)[0])
def test_redact_url_masks_secrets(url: str) -> None:
    """The secret never survives redaction, whatever the scheme."""
    red = redact_url(url)
    assert SECRET not in red, red


class _Failing(http.server.BaseHTTPRequestHandler):
    """Answers every POST with HTTP 500 (a notification receiver that is down)."""

    hits: list[str] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server API
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        _Failing.hits.append(self.path)
        self.send_response(500)
        self.end_headers()
        self.wfile.write(b"down")

    def log_message(self, *args: object) -> None:
        """Silence the default stderr logging."""


def test_failing_apprise_send_logs_no_secret(caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]) -> None:
    """A real send to a receiver answering 500: the failure is logged, with every secret masked
    (healthwatch's and apprise's own log records, at DEBUG, and anything printed)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Failing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    urls = [f"json://alert:{SECRET}@127.0.0.1:{port}/hook?token={SECRET}",
            f"json://127.0.0.1:{port}/{SECRET}/x"]
    caplog.set_level(logging.DEBUG)
    try:
        sink = AppriseSink(urls, timeout=30)
        t = Transition(alert="LossSpike", group="g", state="firing", previous="pending", severity="critical",
                       run="r", step=10, tokens=100, layer=None, value=3.0)
        sink.send([t])
        wait_for(lambda: len(_Failing.hits) >= 2, 60, "both notifications to reach the receiver")
        with pytest.raises(ValueError) as info:
            AppriseSink([f"nosuchscheme://user:{SECRET}@host/"])
        assert SECRET not in str(info.value)
    finally:
        server.shutdown()
    # healthwatch's records at every level, and every library's records from INFO up (apprise's own
    # DEBUG records print webhook paths as they are; the CLI logs at WARNING).
    records = [r for r in caplog.records if r.name.startswith("healthwatch") or r.levelno >= logging.INFO]
    failed = [r.getMessage() for r in records if r.name == "healthwatch.alerts" and "failed" in r.getMessage()]
    assert failed, "the failed send was not logged"
    text = "\n".join(f"{r.name} {r.getMessage()}" for r in records)
    out, err = capfd.readouterr()
    for where, content in (("logs", text), ("stdout", out), ("stderr", err)):
        assert SECRET not in content, f"secret leaked in {where}:\n" + "\n".join(
            line for line in content.splitlines() if SECRET in line)


def test_alerts_watch_cli_prints_redacted_targets(tmp_path: Path) -> None:
    """``healthwatch alerts watch --notify URL --once`` names its targets without the secret."""
    store = tmp_path / "store"
    from healthwatch.store import StoreWriter

    StoreWriter(store, "r").write("scalars", {"attempt": [1], "step": [0], "tokens": [0], "name": ["loss/train"],
                                              "value": [1.0], "wall_time": [0.0]})
    res = subprocess.run(hw_command("alerts", "watch", "--store", str(store), "--once", "--quiet",
                                    "--notify", f"json://user:{SECRET}@127.0.0.1:9/x"),
                         capture_output=True, text=True, timeout=120, env=child_env())
    assert res.returncode == 0, res.stdout + res.stderr
    assert "json://" in res.stderr and SECRET not in res.stdout + res.stderr, res.stdout + res.stderr


if __name__ == "__main__":  # pragma: no cover - print the verdicts for a quick look
    sys.exit(pytest.main([__file__, "-q"]))
