"""The folders are the architecture: every import points down the layers, never up.

    ground (config, layout, model, logs, systemd) < engine < ingestion, recall < learning < observe < front
    < entry points (service, cli)

`replay/` sits below all of them and never imports `daemon/`. The orchestrator
(`daemon.learning.cycle`) is imported only by the entry points, so no view depends on it.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LAYERS = {
    "replay": 0,
    "daemon": 1, "daemon.config": 1, "daemon.layout": 1, "daemon.model": 1, "daemon.logs": 1, "daemon.systemd": 1,
    "daemon.engine": 2,
    "daemon.ingestion": 3, "daemon.recall": 3,
    "daemon.learning": 4,
    "daemon.observe": 5,
    "daemon.front": 6,
    "daemon.service": 7, "daemon.cli": 7,
}
ORCHESTRATOR = "daemon.learning.cycle"


def layer(module: str) -> int:
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in LAYERS:
            return LAYERS[".".join(parts[:end])]
    raise AssertionError(f"{module} is in no layer: add it to LAYERS in {__file__}")


def modules() -> dict[str, Path]:
    found = {}
    for package in ("daemon", "replay"):
        for path in (REPO / package).rglob("*.py"):
            name = ".".join(path.relative_to(REPO).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def imports(path: Path) -> set[str]:
    """The first-party modules `path` imports, lazily inside functions too."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules() else node.module
                      for alias in node.names}
    return {name for name in found if name.split(".")[0] in ("daemon", "replay")}


def test_every_module_belongs_to_a_layer() -> None:
    for name in modules():
        layer(name)


def test_imports_never_point_up() -> None:
    upward = [f"{name} -> {target}" for name, path in modules().items() for target in imports(path)
              if layer(target) > layer(name)]
    assert not upward, "imports that point up the layers:\n" + "\n".join(sorted(upward))


def test_replay_knows_nothing_of_the_daemon() -> None:
    leaks = [f"{name} -> {target}" for name, path in modules().items() if name.startswith("replay")
             for target in imports(path) if target.startswith("daemon")]
    assert not leaks, leaks


def test_only_the_entry_points_import_the_orchestrator() -> None:
    users = {name for name, path in modules().items() if ORCHESTRATOR in imports(path)}
    assert users <= {"daemon.service", "daemon.cli"}, users


def test_each_package_says_what_it_owns() -> None:
    for package in ("daemon", "daemon.engine", "daemon.ingestion", "daemon.learning", "daemon.observe", "daemon.front",
                    "replay"):
        doc = " ".join((ast.get_docstring(ast.parse(modules()[package].read_text(encoding="utf-8"))) or "").split())
        assert "Owns" in doc and "Knows nothing" in doc, f"{package}/__init__.py needs a docstring: owns / knows nothing"
