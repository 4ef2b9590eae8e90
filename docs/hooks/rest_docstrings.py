"""griffe extension: the package's reST-flavoured docstrings, rendered as Markdown.

The docstrings of ``dist_ohem`` are Google style with a few reST habits that Markdown
does not know. mkdocstrings loads this extension (mkdocs.yml, ``extensions:``), which
rewrites every docstring of the package before it is parsed:

- a Sphinx role, ``:class:`~dist_ohem.OHEMLoss```, becomes a cross-reference: a link
  when the object has an entry in the API reference, a code span otherwise. Names are
  resolved as Sphinx would, in the scope of the docstring's object; a name outside the
  package (``torch.Tensor``) becomes a code span. A name that resolves to nothing is
  rendered as ``<code class="dist-ohem-unresolved">``, which tests/test_docs_site.py
  rejects: no entry cites something that does not exist;
- a literal block (a paragraph ending in ``::`` and the indented block after it) becomes
  a fenced code block, and the ``::`` goes as Sphinx drops it;
- a reST simple table (``====  ====`` rules) becomes a Markdown table;
- a Google ``Args:`` entry naming two parameters (``a, b: ...``) becomes one entry per
  name, the second pointing to the first; a ``Raises:`` entry without its colon gets
  one.

The source files are not touched: only what the site shows.
"""

from __future__ import annotations

import html
import re
from typing import Any

import griffe

PACKAGE = "dist_ohem"
ROLE = re.compile(
    r":(?:py:)?(?P<role>class|func|meth|attr|mod|data|exc|obj|const):"
    r"`(?P<tilde>~?)(?P<text>[^`<]+?)(?:\s*<(?P<target>[^`>]+)>)?`"
)
#: A reST simple-table rule: two or more runs of ``=`` separated by spaces.
TABLE_RULE = re.compile(r"^\s*=+(?: +=+)+\s*$")
#: A Google-style entry naming two or more parameters: ``    a, b: text``.
MULTI_PARAM = re.compile(r"^(?P<indent>\s+)(?P<names>\w+(?:, \w+)+): (?P<text>.*)$")
SECTION = re.compile(r"^\s*(Args|Arguments|Parameters|Params):\s*$")
RAISES = re.compile(r"^\s*Raises:\s*$")
#: A Google ``Raises:`` entry: ``Name: text`` or ``A, B: text``.
RAISES_ENTRY = re.compile(r"^\s*[\w.]+(?:, [\w.]+)*:(?:\s|$)")
CALLABLE_ROLES = {"func", "meth"}


def _lookup(package: griffe.Module, path: str) -> bool:
    """Whether ``path`` (under the package) names an object of it."""
    if path == PACKAGE:
        return True
    try:
        obj = package[path[len(PACKAGE) + 1 :]]
        if isinstance(obj, griffe.Alias):
            obj.final_target  # noqa: B018 - resolves the alias or raises
    except (KeyError, griffe.AliasResolutionError, griffe.CyclicAliasError):
        return False
    return True


def resolve(package: griffe.Module, scope: griffe.Object, name: str) -> str | None:
    """The full path ``name`` refers to in ``scope``, or None.

    A path outside the package is returned as is (it is not checked).
    """
    name = name.lstrip(".")
    if name == PACKAGE or name.startswith(PACKAGE + "."):
        return name if _lookup(package, name) else None
    first, _, rest = name.partition(".")
    candidates = []
    try:
        candidates.append(scope.resolve(first))
    except griffe.NameResolutionError:
        pass
    # A method or attribute named bare in a method's docstring: the class's member.
    parent = scope.parent
    while parent is not None:
        if first in parent.members:
            candidates.append(f"{parent.path}.{first}")
        parent = parent.parent
    for found in candidates:
        full = f"{found}.{rest}" if rest else found
        if not (full == PACKAGE or full.startswith(PACKAGE + ".")):
            return full  # outside the package (torch, transformers, ...)
        if _lookup(package, full):
            return full
    return None


def reference(package: griffe.Module, scope: griffe.Object, match: re.Match[str]) -> str:
    """The HTML of one role."""
    target = (match["target"] or match["text"]).strip()
    shown = match["text"].strip()
    if match["tilde"]:
        shown = shown.rsplit(".", 1)[-1]
    if match["role"] in CALLABLE_ROLES and not shown.endswith(")"):
        shown += "()"
    code = f"<code>{html.escape(shown)}</code>"
    full = resolve(package, scope, target)
    if full is None:
        return (
            f'<code class="dist-ohem-unresolved" title="{html.escape(target)} '
            f'(cited in {scope.path}) does not exist">{html.escape(shown)}</code>'
        )
    if not full.startswith(PACKAGE):
        return code
    return f'<autoref identifier="{html.escape(full)}" optional>{code}</autoref>'


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def literal_blocks(text: str) -> str:
    """``para::`` + an indented block: the paragraph (``::`` dropped) and a fence."""
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.rstrip()
        if not stripped.endswith("::") or stripped.endswith(":::"):
            out.append(line)
            i += 1
            continue
        base = _indent(line)
        head = stripped[:-2]
        if head.strip():
            out.append(head + ("" if head.endswith(" ") else ":"))
        # the block: blank lines, then lines indented deeper than the paragraph
        j = i + 1
        while j < len(lines) and not lines[j].strip():
            j += 1
        block_start = j
        while j < len(lines) and (not lines[j].strip() or _indent(lines[j]) > base):
            j += 1
        while j > block_start and not lines[j - 1].strip():
            j -= 1
        block = lines[block_start:j]
        if not block:
            i += 1
            continue
        depth = min(_indent(b) for b in block if b.strip())
        fence_indent = " " * (base - base % 4)
        out.append("")
        out.append(f"{fence_indent}```python")
        out.extend(fence_indent + b[depth:] if b.strip() else "" for b in block)
        out.append(f"{fence_indent}```")
        i = j
    return "\n".join(out)


def _cells(row: str, starts: list[int]) -> list[str]:
    """A table row cut at each column's start, or after a cell that runs past it."""
    parts, cut = [], starts[0]
    for start in starts[1:]:
        end = max(start, cut)
        if end < len(row) and row[end - 1] != " ":
            space = row.find(" ", end)
            end = len(row) if space < 0 else space
        parts.append(row[cut:end].strip())
        cut = end
    parts.append(row[cut:].strip())
    return parts


def simple_tables(text: str) -> str:
    """reST simple tables (a rule, a header, a rule, rows, a rule) as Markdown tables."""
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        rules = [j for j in range(i, min(len(lines), i + 200)) if TABLE_RULE.match(lines[j])]
        if not rules or rules[0] != i or len(rules) < 3:
            out.append(lines[i])
            i += 1
            continue
        starts = [m.start() for m in re.finditer(r"=+", lines[i])]
        ncols = len(starts)
        indent = " " * starts[0]

        header = [_cells(r, starts) for r in lines[rules[0] + 1 : rules[1]] if r.strip()]
        body = [_cells(r, starts) for r in lines[rules[1] + 1 : rules[2]] if r.strip()]
        head = header[0] if header else [""] * ncols
        out.append(indent + "| " + " | ".join(head) + " |")
        out.append(indent + "|" + "---|" * ncols)
        out.extend(indent + "| " + " | ".join(row) + " |" for row in body)
        i = rules[2] + 1
    return "\n".join(out)


def split_multi_params(text: str) -> str:
    """``a, b: text`` in an Args section: ``a: text`` and ``b: see a``."""
    lines = text.split("\n")
    out: list[str] = []
    in_args = False
    for line in lines:
        if SECTION.match(line):
            in_args = True
        elif line.strip() and _indent(line) == 0:
            in_args = False
        match = MULTI_PARAM.match(line) if in_args else None
        if match is None:
            out.append(line)
            continue
        first, *others = match["names"].split(", ")
        pending = [f"{match['indent']}{name}: see `{first}`." for name in others]
        out.append(f"{match['indent']}{first}: (with {', '.join(others)}) {match['text']}")
        out.append("\0" + "\n".join(pending))  # placed after the entry's continuation
    # move each pending block after its entry's continuation lines
    result: list[str] = []
    waiting: str | None = None
    entry_indent = 0
    for line in out:
        if line.startswith("\0"):
            waiting = line[1:]
            entry_indent = _indent(waiting.split("\n")[0])
            continue
        if waiting is not None and (not line.strip() or _indent(line) <= entry_indent):
            result.extend(waiting.split("\n"))
            waiting = None
        result.append(line)
    if waiting is not None:
        result.extend(waiting.split("\n"))
    return "\n".join(result)


def lenient_raises(text: str) -> str:
    """A ``Raises:`` entry without its colon (``Error (a ValueError) when ...``, its
    continuation at the same indent) as ``Error: (a ValueError) when ...``."""
    lines = text.split("\n")
    out: list[str] = []
    entry_indent: int | None = None
    header_indent = 0
    previous_was_entry = False
    for line in lines:
        if RAISES.match(line):
            entry_indent, header_indent, previous_was_entry = None, _indent(line), False
            out.append(line)
            continue
        if entry_indent is None and line.strip() and out and RAISES.match(out[-1]):
            entry_indent = _indent(line)
        if entry_indent is None or not line.strip() or _indent(line) <= header_indent:
            if line.strip() and _indent(line) <= header_indent:
                entry_indent = None
            out.append(line)
            previous_was_entry = False
            continue
        if _indent(line) == entry_indent and not RAISES_ENTRY.match(line):
            if previous_was_entry:  # a continuation written at the entry's indent
                out.append("    " + line)
                continue
            name, _, rest = line.strip().partition(" ")
            out.append(" " * entry_indent + f"{name}: {rest}")
            previous_was_entry = True
            continue
        previous_was_entry = _indent(line) == entry_indent or previous_was_entry
        out.append(line)
    return "\n".join(out)


def convert(package: griffe.Module, obj: griffe.Object, text: str) -> str:
    """One docstring, reST habits replaced."""
    text = simple_tables(text)
    text = literal_blocks(text)
    text = split_multi_params(text)
    text = lenient_raises(text)
    return ROLE.sub(lambda m: reference(package, obj, m), text)


class RestDocstrings(griffe.Extension):
    """Rewrites the package's docstrings once it is loaded."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        if pkg.path != PACKAGE:
            return
        seen: set[str] = set()

        def walk(obj: griffe.Object) -> None:
            if obj.path in seen:
                return
            seen.add(obj.path)
            if obj.docstring is not None:
                obj.docstring.value = convert(pkg, obj, obj.docstring.value)
            for member in obj.members.values():
                if not isinstance(member, griffe.Alias):
                    walk(member)

        walk(pkg)
