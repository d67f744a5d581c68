"""Find every ``healthwatch …`` command that README.md and docs/*.md show, and make it runnable.

Two kinds of places hold commands:

* fenced shell blocks (```` ```bash ````, ```` ```console ````, ```` ``` ````): a line that starts with
  ``healthwatch`` (after an optional ``$ `` prompt; in a block with prompts only prompted lines are
  commands), with ``\\`` continuations. ``…; echo rc=$?`` followed by an output line ``rc=N`` means
  the docs show the command failing with exit status N, which is then what is expected.
* inline code spans (```healthwatch compare --store S --runs A B … --out FILE```): usage synopses.
  Their placeholders (upper-case words such as ``S``, ``R``, ``FILE``) are filled from the option
  they follow; optional ``[…]`` groups give two commands (without them, and with all of them, the
  first of any ``a|b`` alternatives); a list of sub-commands (``alerts check|test|watch``) gives
  ``--help`` of each.

Lines that install on a fresh machine (``pip install …``) are not commands to run here.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FENCE = re.compile(r"^```([\w+-]*)\s*$")
SHELL_LANGS = {"", "bash", "sh", "shell", "console", "shell-session", "zsh"}
INLINE = re.compile(r"`(healthwatch [^`\n]+)`")
PLACEHOLDER = re.compile(r"^[A-Z][A-Z_]*$")


@dataclass
class DocCommand:
    """One command to run: where the docs show it, its words, and the exit status they show."""

    source: str  # "README.md:64"
    text: str  # as shown (after synopsis expansion)
    argv: list[str]
    expect_rc: int = 0
    synopsis: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def id(self) -> str:
        """A short test id: source and command."""
        return f"{self.source} {self.text}"[:150]


def doc_files(repo: Path = REPO) -> list[Path]:
    """README.md and every docs/*.md (read at collection time: new docs are picked up)."""
    return [repo / "README.md", *sorted((repo / "docs").glob("*.md"))]


def _fenced_blocks(lines: list[str]) -> list[tuple[str, int, list[str]]]:
    """(language, first line number, lines) of each fenced block."""
    blocks, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i].strip())
        if m is None:
            i += 1
            continue
        lang, start, body = m.group(1).lower(), i + 2, []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith("```"):
            body.append(lines[i])
            i += 1
        blocks.append((lang, start, body))
        i += 1
    return blocks


def _strip_comment(line: str) -> str:
    """Drop a trailing shell comment (`` # …`` outside quotes)."""
    quote = None
    for k, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (k == 0 or line[k - 1].isspace()):
            return line[:k].rstrip()
    return line.rstrip()


def block_commands(path: Path, rel: str) -> list[DocCommand]:
    """Commands in the fenced shell blocks of one Markdown file."""
    out: list[DocCommand] = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for lang, start, body in _fenced_blocks(lines):
        if lang not in SHELL_LANGS:
            continue
        prompted = any(b.startswith("$ ") for b in body)
        k = 0
        while k < len(body):
            raw, lineno = body[k], start + k
            k += 1
            if prompted and not raw.startswith("$ "):
                continue
            text = raw[2:] if raw.startswith("$ ") else raw
            while text.rstrip().endswith("\\") and k < len(body):  # continuation lines
                text = text.rstrip()[:-1] + " " + body[k].strip()
                k += 1
            text = _strip_comment(text.strip())
            if not text.startswith("healthwatch ") and text != "healthwatch":
                continue  # python, pip, other tools: not ours to run here
            expect = 0
            if "; echo rc=$?" in text:
                text = text.split(";")[0].strip()
                for later in body[k:]:
                    m = re.match(r"^rc=(\d+)\s*$", later.strip())
                    if m:
                        expect = int(m.group(1))
                        break
                    if later.startswith("$ "):
                        break
            variants = _expand_synopsis(text) if "[" in text else [text]  # `[--port 8501]` in a block
            for variant in variants:
                out.append(DocCommand(f"{rel}:{lineno}", variant, shlex.split(variant), expect))
    return out


def _without_fences(text: str) -> str:
    """The Markdown with fenced blocks blanked (their lines kept, so line numbers hold)."""
    lines, inside = text.splitlines(), False
    for i, line in enumerate(lines):
        if line.strip().startswith("```"):
            inside = not inside
            lines[i] = ""
        elif inside:
            lines[i] = ""
    return "\n".join(lines)


def _expand_synopsis(span: str) -> list[str]:
    """Concrete command texts for one synopsis span (see the module docstring)."""
    span = span.replace("\\|", "|").replace("…", " ").replace("...", " ")
    words = span.split()
    # `healthwatch alerts check|test|watch|backtest`: a menu of sub-commands (their `--help`);
    # `healthwatch export tensorboard|wandb --store S --run R`: one command per sub-command.
    for i, w in enumerate(words):
        if "|" in w and "[" not in w and "]" not in w and i <= 2 and not w.startswith("-"):
            rest = words[i + 1:]
            return [out for alt in w.split("|")
                    for out in _expand_synopsis(" ".join([*words[:i], alt, *(rest or ["--help"])]))]
    span = " ".join(words)
    groups = re.findall(r"\[([^\[\]]+)\]", span)
    bare = re.sub(r"\s*\[[^\[\]]+\]", "", span)
    variants = [bare]
    if groups:
        full = re.sub(r"\[([^\[\]]+)\]", r"\1", span)
        variants.append(full)
    out = []
    for v in variants:
        # `latest|all|none` -> the first alternative
        v = " ".join(w.split("|")[0] if "|" in w else w for w in v.split())
        if v not in out:
            out.append(v)
    return out


def inline_commands(path: Path, rel: str) -> list[DocCommand]:
    """Commands in inline code spans (synopses) of one Markdown file."""
    out: list[DocCommand] = []
    text = _without_fences(path.read_text(encoding="utf-8"))
    for lineno, line in enumerate(text.splitlines(), 1):
        for m in INLINE.finditer(line):
            span = m.group(1).strip()
            if "pip install" in span:
                continue
            for variant in _expand_synopsis(span):
                argv = shlex.split(variant)
                if len(argv) < 2:
                    continue  # "`healthwatch …`" in prose: no command
                if all(re.fullmatch(r"[a-z][a-z-]*", w) for w in argv[1:]) and len(argv) <= 3:
                    # A bare name in prose ("run `healthwatch compact`") names the command; its
                    # runnable forms are shown elsewhere. Check that it exists.
                    argv.append("--help")
                    variant += " --help"
                out.append(DocCommand(f"{rel}:{lineno}", variant, argv, 0, synopsis=True))
    return out


def all_commands(repo: Path = REPO) -> list[DocCommand]:
    """Every command of README.md and docs/*.md, the first showing of each text kept."""
    seen: set[str] = set()
    out: list[DocCommand] = []
    for path in doc_files(repo):
        if not path.exists():
            continue
        rel = str(path.relative_to(repo))
        for cmd in [*block_commands(path, rel), *inline_commands(path, rel)]:
            key = " ".join(cmd.argv)
            if key in seen:
                continue
            seen.add(key)
            out.append(cmd)
    return out


# ----------------------------------------------------------------------------------------------
# filling in placeholders and example values


@dataclass
class Fixture:
    """What the commands run against: a store copy, a scratch directory, a local webhook URL."""

    store: Path
    scratch: Path
    runs: list[str]  # existing runs: [low-precision parent, its branch, ...]
    notify_url: str
    tb_logdir: Path
    port: int


VALUE_OPTS = {"--store", "--run", "--runs", "--out", "--rules", "--jsonl", "--notify", "--port", "--attempt",
              "--interval", "--metric", "--backfill", "--start", "--host"}


def _sub(argv: list[str]) -> str:
    """The sub-command path (``alerts watch``, ``import tensorboard``, ``app``)."""
    words = [w for w in argv[1:] if not w.startswith("-")]
    if words[:1] in (["alerts"], ["import"], ["export"]):
        return " ".join(words[:2])
    return words[0] if words else ""


def concretize(cmd: DocCommand, fx: Fixture) -> list[str]:
    """The argv to run: the store, runs, files and URLs of the docs replaced by the fixture's.

    Example values are kept where they make sense (metric names, intervals); store paths, run
    names not in the store, output files and notification URLs are replaced, so that nothing is
    written outside the scratch directory and nothing is sent anywhere but to 127.0.0.1.
    """
    argv = list(cmd.argv)
    sub = _sub(argv)
    out: list[str] = [argv[0]]
    prev = None
    runs_seen = 0
    positional = 0
    for w in argv[1:]:
        opt = prev if prev in VALUE_OPTS else None
        if "=" in w and w.startswith("--") and w.split("=", 1)[0] in VALUE_OPTS:
            name, val = w.split("=", 1)
            out += [name, _value(name, val, sub, fx, runs_seen)]
            prev = None
            continue
        if opt == "--runs" or (prev == "__runs__" and not w.startswith("-")):
            out.append(_value("--runs", w, sub, fx, runs_seen))
            runs_seen += 1
            prev = "__runs__"
            continue
        if opt is not None:
            out.append(_value(opt, w, sub, fx, runs_seen))
            prev = None
            continue
        if w.startswith("-"):
            out.append(w)
            prev = w
            continue
        # positional words: sub-command names, then arguments
        if w in sub.split():
            out.append(w)
        else:
            positional += 1
            out.append(_positional(w, sub, fx))
        prev = None
    if kind(out) == "server" and "--port" not in out:
        out += ["--port", str(fx.port)]  # never the default port: another server may hold it
    return out


def _value(opt: str, val: str, sub: str, fx: Fixture, runs_seen: int) -> str:
    ph = bool(PLACEHOLDER.match(val))
    if opt == "--store":
        return str(fx.scratch / "demo-store") if sub == "demo" else str(fx.store)
    if opt == "--run":
        if sub.startswith("import "):
            return "imported" if ph else val
        return val if val in fx.runs else fx.runs[0]
    if opt == "--runs":
        if val in fx.runs:
            return val
        return fx.runs[0] if runs_seen == 0 else fx.runs[min(runs_seen, len(fx.runs) - 1)]
    if opt in ("--out", "--jsonl"):
        placeholder_names = {"--out": "out.csv", "--jsonl": "alerts.jsonl"}
        name = Path(val).name if not ph else ("out-dir" if val in ("DIR", "LOGDIR") else placeholder_names[opt])
        return str(fx.scratch / name)
    if opt == "--rules":
        return "alerts/packs/default.yaml" if ph or not Path(fx.scratch, val).exists() else val
    if opt == "--notify":
        return fx.notify_url
    if opt == "--port":
        return str(fx.port)
    if opt == "--attempt":
        return "1" if ph else val
    if opt == "--interval":
        return "1" if ph else val
    if opt == "--host":
        return "127.0.0.1"
    return val


def _positional(w: str, sub: str, fx: Fixture) -> str:
    ph = bool(PLACEHOLDER.match(w))
    if sub == "alerts check":
        return "alerts/packs/default.yaml" if ph else w
    if sub == "alerts test":
        return "alerts/packs/default_test.yaml" if ph else w
    if sub == "import tensorboard":
        return str(fx.tb_logdir)
    if w.startswith("/"):
        return str(fx.scratch / Path(w).name)
    return w


def kind(argv: list[str]) -> str:
    """``"server"`` (answers on a port), ``"daemon"`` (prints, runs until stopped), ``"long"`` (the
    demo: trains for minutes), or ``"once"`` (runs to completion)."""
    sub = _sub(argv)
    if "--help" in argv:
        return "once"
    if sub == "app":
        return "server"
    if sub == "metrics":
        return "once" if "--once" in argv else "server"
    if sub == "demo":
        return "long"
    if sub == "alerts watch" and "--once" not in argv:
        return "daemon"
    if "--follow" in argv:
        return "daemon"
    return "once"
