"""Package boundaries: engine/ is a library and never imports the CLI or UI stacks."""

from __future__ import annotations

import re
from pathlib import Path

ENGINE = Path(__file__).resolve().parents[1] / "engine"
UI_IMPORT = re.compile(r"^\s*(?:import|from)\s+(typer|rich|textual|mima_cli)\b", re.MULTILINE)
PRINT = re.compile(r"^\s*print\(", re.MULTILINE)


def test_engine_never_imports_cli_or_ui():
    offenders = [
        f"{path.relative_to(ENGINE.parent)}: {m.group(1)}"
        for path in sorted(ENGINE.rglob("*.py"))
        for m in UI_IMPORT.finditer(path.read_text(encoding="utf-8"))
    ]
    assert offenders == []


def test_engine_modules_do_not_print():
    # scripts run by hand (engine/data/make_*.py) may print; library modules log through EventLogger
    offenders = [
        str(path.relative_to(ENGINE.parent))
        for path in sorted(ENGINE.rglob("*.py"))
        if not path.name.startswith("make_") and PRINT.search(path.read_text(encoding="utf-8"))
    ]
    assert offenders == []
