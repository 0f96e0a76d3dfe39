#!/usr/bin/env python
"""Write docs/architecture.md: lmtrain's folders, their modules (with each module's first docstring
paragraph) and which folder imports which, read from the source with `ast`, so the page
cannot drift from the code. tests/test_imports.py enforces the same layering.

    python scripts/architecture.py          # writes docs/architecture.md
    python scripts/architecture.py --check  # exit 1 if docs/architecture.md is not what this writes
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

from doc_sections import write_or_check

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "lmtrain"
PAGE = ROOT / "docs" / "architecture.md"
# Bottom to top, as tests/test_imports.py's ALLOWED lists them.
ORDER = ["errors", "files", "config", "speed", "backprop", "data", "model", "checkpoint", "evaluation", "training",
         "cli"]


def modules() -> dict[str, Path]:
    """Dotted names below lmtrain ("model.cells", "config"), package files excluded, with their paths."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] not in ("__init__", "__main__"):
            found[".".join(parts)] = path
    return found


def imports(path: Path, known: set[str]) -> set[str]:
    """The lmtrain modules `path` imports (anywhere in it), by dotted name below lmtrain."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lmtrain"):
            base = node.module.removeprefix("lmtrain").lstrip(".")
            for alias in node.names:
                name = f"{base}.{alias.name}".lstrip(".")
                names.add(name if name in known else base)
        elif isinstance(node, ast.Import):
            names.update(alias.name.removeprefix("lmtrain.") for alias in node.names
                         if alias.name.startswith("lmtrain."))
    return {name for name in names if name in known or is_package(name)}


def is_package(name: str) -> bool:
    """Whether `name` is a folder with its own `__init__.py` (`config`), imported as a whole."""
    return (PACKAGE.joinpath(*name.split(".")) / "__init__.py").exists()


def first_line(path: Path) -> str:
    docstring = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
    return " ".join(docstring.split("\n\n")[0].split())


def folder(module: str) -> str:
    return module.split(".")[0]


def page() -> str:
    found = modules()
    graph = {name: imports(path, set(found)) - {name} for name, path in found.items()}
    folders = sorted({folder(name) for name in found}, key=ORDER.index)
    lines = ["# Architecture", "",
             "lmtrain's folders from the bottom layer up: each imports only folders listed before it, never",
             "one after (`tests/test_imports.py` enforces it). A student reads `model/` and `backprop/`, the",
             "lecture's equations, without the speed code, which lives in `speed/` and is the one place that",
             "chooses how a layer runs (`speed/route.py`). Written by `python scripts/architecture.py` from the",
             "source; a test checks that this page is current.", "",
             "| folder | imports | what it holds |", "|---|---|---|"]
    for unit in folders:
        members = [name for name in found if folder(name) == unit]
        uses = sorted({folder(other) for name in members for other in graph[name]} - {unit}, key=ORDER.index)
        package = PACKAGE / unit / "__init__.py"
        what = first_line(package) if package.exists() else first_line(found[members[0]])
        label = f"`{unit}/`" if package.exists() else f"`{unit}.py`"
        lines.append(f"| {label} | {', '.join(uses) or '-'} | {what} |")
    lines += ["", "```mermaid", "graph BT"]
    for unit in folders:
        for other in sorted({folder(b) for a in found if folder(a) == unit for b in graph[a]} - {unit},
                            key=ORDER.index):
            lines.append(f"    {unit} --> {other}")
    lines += ["```", ""]
    for unit in folders:
        members = [name for name in found if folder(name) == unit]
        if (PACKAGE / unit / "__init__.py").exists():
            lines += [f"## `{unit}/`", "", "| module | imports | what it does |", "|---|---|---|"]
            for name in members:
                uses = ", ".join(f"`{other}`" for other in sorted(graph[name])) or "-"
                lines.append(f"| `{name}` | {uses} | {first_line(found[name])} |")
            lines.append("")
    return "\n".join(lines)


def main() -> int:
    return write_or_check(PAGE, page(), script="scripts/architecture.py")


if __name__ == "__main__":
    sys.exit(main())
