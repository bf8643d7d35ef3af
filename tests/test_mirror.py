"""torch_impl/ and tf_impl/ are mirror images: same file names, same public surface.

The public surface is read from the source with ``ast`` (nothing imported):
every module-level name a file defines (functions, classes, assignments) that
does not start with ``_``, and, for every class of the project's own (no
framework base class) that both sides define, its public methods. Names a file only imports are not its surface. A helper that makes
sense on one side only (an nn.Module subclass, a Keras functional builder) is
private (``_name``) there, so the rule stays "same public names", with no
hand-kept list to drift.
"""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FILES = sorted(p.name for p in (ROOT / "torch_impl").glob("*.py"))


def public_surface(path: Path) -> tuple[set[str], dict[str, set[str]]]:
    """(public module-level names, {public class name: its public methods})."""
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    classes: dict[str, set[str]] = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            found = [node.name]
            # Methods are compared for the project's own classes (Backend, TrainStep, pipelines...);
            # a subclass of a framework class (nn.Module, keras Layer) has that framework's hooks.
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_") and not node.bases:
                classes[node.name] = {item.name for item in node.body
                                      if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef))
                                      and not item.name.startswith("_")}
        elif isinstance(node, ast.Assign):
            found = [t.id for t in node.targets if isinstance(t, ast.Name)]
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            found = [node.target.id]
        else:
            continue
        names.update(name for name in found if not name.startswith("_"))
    return names, classes


def test_same_files():
    assert FILES == sorted(p.name for p in (ROOT / "tf_impl").glob("*.py"))


@pytest.mark.parametrize("name", FILES)
def test_same_public_surface(name):
    torch_names, torch_classes = public_surface(ROOT / "torch_impl" / name)
    tf_names, tf_classes = public_surface(ROOT / "tf_impl" / name)
    assert torch_names == tf_names, (f"{name}: only in torch_impl {sorted(torch_names - tf_names)}, "
                                     f"only in tf_impl {sorted(tf_names - torch_names)}")
    for cls in torch_classes.keys() & tf_classes.keys():
        assert torch_classes[cls] == tf_classes[cls], (
            f"{name}: {cls} methods only in torch_impl {sorted(torch_classes[cls] - tf_classes[cls])}, "
            f"only in tf_impl {sorted(tf_classes[cls] - torch_classes[cls])}")


def test_the_check_sees_a_one_sided_name(tmp_path):
    """The rule can fail: a public function or method on one side only is reported."""
    (tmp_path / "a.py").write_text("import os\nX = 1\ndef f(): pass\nclass C:\n    def m(self): pass\n")
    (tmp_path / "b.py").write_text("X = 1\ndef f(): pass\ndef g(): pass\nclass C:\n    def m(self): pass\n"
                                   "    def n(self): pass\n")
    names_a, classes_a = public_surface(tmp_path / "a.py")
    names_b, classes_b = public_surface(tmp_path / "b.py")
    assert names_b - names_a == {"g"} and "os" not in names_a
    assert classes_b["C"] - classes_a["C"] == {"n"}
