"""Lower layers never import higher ones (shared/STYLE.md), and sdlab never imports the reference libraries."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "sdlab"
# what each layer may import from sdlab (besides itself)
ALLOWED = {
    "models": {"config", "errors"},
    "diffusion": {"config", "errors"},
    "tokenizer": {"config", "errors"},
    "prompts": {"config", "errors", "models", "tokenizer"},
    "checkpoints": {"config", "errors", "atomic", "models", "tokenizer", "__init__"},
    "pipelines": {"config", "errors", "atomic", "models", "tokenizer", "prompts", "diffusion", "checkpoints"},
    "backends": {"config", "errors", "models"},
}
FORBIDDEN_EVERYWHERE = {"diffusers", "transformers", "open_clip"}


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def _layer(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_respect_the_layers(path):
    layer = _layer(path)
    for module in _imports(path):
        top = module.split(".")[0]
        assert top not in FORBIDDEN_EVERYWHERE, f"{path.name} imports {module}"
        if layer in ALLOWED and top == "sdlab" and module != "sdlab":
            target = module.split(".")[1]
            assert target == layer or target in ALLOWED[layer], f"{layer}/{path.name} imports {module}"
