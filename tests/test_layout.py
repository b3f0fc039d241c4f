"""api.py reads top to bottom (docs/development.md, shared STYLE.md): its
banner sections come in a fixed order and each uses only names defined in
it or in a section above it."""

from __future__ import annotations

import ast
import re

from conftest import ROOT

SECTIONS = [
    "Configuration",
    "Keys",
    "Messages",
    "Store",
    "Delivery",
    "Notifications",
    "Webhooks",
    "Metrics",
    "HTTP",
    "Command line",
]
BANNER_RE = re.compile(r"^# ([A-Z][A-Za-z ]+?) #{5,}$")


def _sections(lines: list[str]) -> list[tuple[int, str]]:
    """(first line, name) of each banner section, in order."""
    return [
        (number, match.group(1))
        for number, line in enumerate(lines, start=1)
        if (match := BANNER_RE.match(line))
    ]


def _names_above_their_section(source: str) -> list[str]:
    """Each use of a module-level name in a section above the one that defines
    it, as "line N: section uses NAME (from section)"."""
    sections = _sections(source.splitlines())

    def section_of(line: int) -> str | None:
        found = None
        for start, name in sections:
            if start <= line:
                found = name
        return found

    tree = ast.parse(source)
    defined: dict[str, str | None] = {}
    for node in tree.body:
        names: list[str] = []
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names = [node.name]
        elif isinstance(node, ast.Assign):
            names = [t.id for t in node.targets if isinstance(t, ast.Name)]
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names = [node.target.id]
        for name in names:
            defined.setdefault(name, section_of(node.lineno))
    order = [name for _, name in sections]
    found = []

    def visit(node: ast.AST, local: frozenset[str]) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            own = {a.arg for a in ast.walk(node.args) if isinstance(a, ast.arg)}
            own |= {
                n.id
                for n in ast.walk(node)
                if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)
            }
            local = local | own
        if isinstance(node, ast.Name) and node.id in defined and node.id not in local:
            used, home = section_of(node.lineno), defined[node.id]
            if used and home and order.index(home) > order.index(used):
                found.append(f"line {node.lineno}: {used} uses {node.id} (from {home})")
        for child in ast.iter_child_nodes(node):
            visit(child, local)

    visit(tree, frozenset())
    return found


def test_api_py_has_its_sections_in_order():
    lines = (ROOT / "api.py").read_text().splitlines()
    assert [name for _, name in _sections(lines)] == SECTIONS


def test_no_section_of_api_py_uses_a_name_defined_below_it():
    assert _names_above_their_section((ROOT / "api.py").read_text()) == []


def test_the_layout_check_finds_a_name_used_above_its_section():
    """The check above can fail: a use placed above its definition is found."""
    source = (
        "# Keys ####################\n"
        "def key():\n    return Store()\n"
        "# Store ###################\n"
        "class Store:\n    pass\n"
    )
    assert _names_above_their_section(source) == [
        "line 3: Keys uses Store (from Store)"
    ]
