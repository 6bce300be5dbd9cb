"""The folder layout is the architecture: the lower layers never import the upper ones.

    cli -> harness, service -> orchestrator -> guest (backends), memory, storage
                                            -> protocol, transport, netem

A backend never imports the engine that drives it (issue 9, section 1), nor a daemon.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import xmig

ROOT = Path(xmig.__file__).parent
UPPER = ("xmig.orchestrator", "xmig.service", "xmig.harness", "xmig.cli")
LOWER = ("guest", "memory", "storage", "protocol", "transport", "netem")


def imported(path: Path) -> set[str]:
    """Every module ``path`` imports (absolute names)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
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
    module.write_text("from xmig.orchestrator.source import run_source\nimport xmig.cli\n")
    assert {"xmig.orchestrator.source", "xmig.cli"} <= imported(module)
