"""The layers import one way: HTTP -> services -> persistence, and drivers stay pure."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "mycloud_compute"

# Layer -> packages of mycloud_compute it must not import.
FORBIDDEN = {
    "persistence": {"api", "services", "worker", "scheduler", "drivers", "cli"},
    "services": {"api", "worker", "cli"},
    # Drivers never touch the database; they may use the state values of
    # services.lifecycle, which is plain data.
    "drivers": {"api", "persistence", "worker", "scheduler", "cli"},
    "scheduler": {"api", "worker", "cli"},
    "worker": {"api", "cli"},
    "api": {"cli"},
    # The SDK is the customer's side of the HTTP API: it reaches the service only over HTTP.
    "client": {"api", "services", "persistence", "worker", "scheduler", "drivers", "cli"},
}


def _imported_layers(path: Path) -> set[str]:
    layers = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        for name in names:
            parts = name.split(".")
            if parts[0] == "mycloud_compute" and len(parts) > 1:
                layers.add(parts[1])
    return layers


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_imports(layer: str) -> None:
    files = sorted((PACKAGE / layer).rglob("*.py"))
    assert files, f"no modules found in {layer}"
    violations = {
        str(path.relative_to(PACKAGE)): sorted(_imported_layers(path) & FORBIDDEN[layer])
        for path in files
    }
    assert {path: found for path, found in violations.items() if found} == {}
