"""The folder layout is the architecture: the lower layers never import the upper ones.

    cli -> harness, service -> orchestrator -> guest (backends), memory, storage, convergence
                                            -> protocol, transport, netem

A backend never imports the engine that drives it (issue 9, section 1), nor a daemon.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import xmig

ROOT = Path(xmig.__file__).parent
UPPER = ("xmig.orchestrator", "xmig.service", "xmig.harness", "xmig.cli")
LOWER = ("guest", "memory", "storage", "convergence", "protocol", "transport", "netem")


#: ``import a.b, c as d`` and ``from a.b import c, d as e`` (parenthesized lists joined)
IMPORT = re.compile(r"^[ \t]*(?:from[ \t]+([\w.]+)[ \t]+import[ \t]+([^\n]+)|import[ \t]+([^\n]+))",
                    re.MULTILINE)


def imported(path: Path) -> set[str]:
    """Every module ``path`` imports (absolute names). By pattern, not ``ast.parse``:
    CPython 3.11's AST constructor can fail with a SystemError ("recursion depth
    mismatch") when other threads of the test process build ASTs."""
    text = re.sub(r"\(([^)]*)\)", lambda m: m.group(1).replace("\n", " "),
                  path.read_text())
    names: set[str] = set()
    for module, members, plain in IMPORT.findall(text):
        if module:
            names.add(module)
            names.update(f"{module}.{n.split()[0]}" for n in members.split(",") if n.strip())
        else:
            names.update(n.split()[0] for n in plain.split(",") if n.strip())
    return names


@pytest.mark.parametrize("layer", LOWER)
def test_a_lower_layer_imports_no_engine_daemon_harness_or_cli(layer: str) -> None:
    offending = {
        str(path.relative_to(ROOT)): sorted(n for n in imported(path) if n.startswith(UPPER))
        for path in sorted((ROOT / layer).rglob("*.py"))}
    assert {k: v for k, v in offending.items() if v} == {}


def test_the_engine_imports_no_daemon_harness_or_cli() -> None:
    upper = ("xmig.service", "xmig.harness", "xmig.cli")
    offending = {
        str(path.relative_to(ROOT)): sorted(n for n in imported(path) if n.startswith(upper))
        for path in sorted((ROOT / "orchestrator").rglob("*.py"))}
    assert {k: v for k, v in offending.items() if v} == {}


def test_the_checker_sees_an_upward_import(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("from xmig.orchestrator.source import run_source\nimport xmig.cli\n"
                      "from xmig import (\n    control,\n    service,\n)\n")
    assert {"xmig.orchestrator.source", "xmig.cli", "xmig.service"} <= imported(module)
