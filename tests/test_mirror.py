"""torch_impl/ and tf_impl/ are mirror images: same file names and the same public API (``__all__``).

Read with ``ast`` (nothing imported). Helpers that only make sense on one side
(nn.Module classes, Keras functional builders) stay out of ``__all__``.
"""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FILES = sorted(p.name for p in (ROOT / "torch_impl").glob("*.py"))


def _module(path: Path) -> tuple[list[str] | None, set[str]]:
    """(__all__, names defined at top level)."""
    tree = ast.parse(path.read_text())
    exported, defined = None, set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            defined.add(node.name)
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    defined.add(target.id)
                    if target.id == "__all__":
                        exported = ast.literal_eval(node.value)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            defined.update((a.asname or a.name).split(".")[0] for a in node.names)
    return exported, defined


def test_same_files():
    assert FILES == sorted(p.name for p in (ROOT / "tf_impl").glob("*.py"))


@pytest.mark.parametrize("name", [f for f in FILES if f != "__init__.py"])
def test_same_public_api(name):
    torch_all, torch_defined = _module(ROOT / "torch_impl" / name)
    tf_all, tf_defined = _module(ROOT / "tf_impl" / name)
    assert torch_all is not None and tf_all is not None, f"{name}: declare __all__ on both sides"
    assert torch_all == tf_all
    assert set(torch_all) <= torch_defined and set(tf_all) <= tf_defined
