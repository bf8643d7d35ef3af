"""torch_impl/, tf_impl/ and kerastorch_impl/ are mirror images: same file names, same public surface.

The public surface is read from the source with ``ast`` (nothing imported):
every module-level name a file defines (functions, classes, assignments) that
does not start with ``_``, and, for every class of the project's own (no
framework base class) that the sides define, its public methods. Names a file
only imports are not its surface, with one exception: the names a Keras
backend imports from ``keras_impl`` (the Keras code both Keras backends share,
written once in keras.ops) ARE its surface, since that is where its models,
layers and weight I/O are defined; and the names kerastorch_impl takes as they are
from ``torch_impl`` (the same framework's thread pools, say). A helper that makes sense on one side only
(an nn.Module subclass, a Keras functional builder) is private (``_name``)
there, so the rule stays "same public names", with no hand-kept list to drift.
"""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FILES = sorted(p.name for p in (ROOT / "torch_impl").glob("*.py"))
MIRRORS = ("tf_impl", "kerastorch_impl")  # each compared with torch_impl
SHARED_PACKAGE = "keras_impl"  # names imported from here are the importing file's own surface
REEXPORTED_FROM = ("torch_impl",)  # so are names a mirror takes as they are from torch_impl (same framework)


def public_surface(path: Path) -> tuple[set[str], dict[str, set[str]]]:
    """(public module-level names, {public class name: its public methods})."""
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    classes: dict[str, set[str]] = {}
    sources = {SHARED_PACKAGE, *REEXPORTED_FROM} - {path.parent.name}  # torch_impl's own imports are not
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
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in sources:
            found = [alias.asname or alias.name for alias in node.names]
        else:
            continue
        names.update(name for name in found if not name.startswith("_"))
    return names, classes


@pytest.mark.parametrize("mirror", MIRRORS)
def test_same_files(mirror):
    assert FILES == sorted(p.name for p in (ROOT / mirror).glob("*.py"))


@pytest.mark.parametrize("mirror", MIRRORS)
@pytest.mark.parametrize("name", FILES)
def test_same_public_surface(name, mirror):
    torch_names, torch_classes = public_surface(ROOT / "torch_impl" / name)
    other_names, other_classes = public_surface(ROOT / mirror / name)
    assert torch_names == other_names, (f"{name}: only in torch_impl {sorted(torch_names - other_names)}, "
                                        f"only in {mirror} {sorted(other_names - torch_names)}")
    for cls in torch_classes.keys() & other_classes.keys():
        assert torch_classes[cls] == other_classes[cls], (
            f"{name}: {cls} methods only in torch_impl {sorted(torch_classes[cls] - other_classes[cls])}, "
            f"only in {mirror} {sorted(other_classes[cls] - torch_classes[cls])}")


def test_keras_impl_imports_no_framework():
    """keras_impl is written in keras/keras.ops: importing tensorflow or torch there would tie the shared
    Keras code to one backend (the backend packages hold what is framework-specific)."""
    for path in sorted((ROOT / SHARED_PACKAGE).glob("*.py")):
        assert not framework_imports(path), f"{path.name} imports {framework_imports(path)}"


def framework_imports(path: Path) -> set[str]:
    """Top-level packages of tensorflow/torch family that ``path`` imports."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        modules = [a.name for a in node.names] if isinstance(node, ast.Import) else (
            [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
        found |= {m.split(".")[0] for m in modules} & {"tensorflow", "torch", "torchvision", "jax", "tf_impl",
                                                          "torch_impl", "kerastorch_impl"}
    return found


def test_the_check_sees_a_one_sided_name(tmp_path):
    """The rule can fail: a public function or method on one side only is reported."""
    (tmp_path / "a.py").write_text("import os\nX = 1\ndef f(): pass\nclass C:\n    def m(self): pass\n")
    (tmp_path / "b.py").write_text("X = 1\ndef f(): pass\ndef g(): pass\nclass C:\n    def m(self): pass\n"
                                   "    def n(self): pass\n")
    names_a, classes_a = public_surface(tmp_path / "a.py")
    names_b, classes_b = public_surface(tmp_path / "b.py")
    assert names_b - names_a == {"g"} and "os" not in names_a
    assert classes_b["C"] - classes_a["C"] == {"n"}


def test_the_checks_see_a_shared_reexport_and_a_framework_import(tmp_path):
    """A name re-exported from keras_impl counts as surface (another import does not), and a framework
    import in a keras_impl-like file is found."""
    (tmp_path / "a.py").write_text("from keras_impl.models import create_model\nfrom os import path\n")
    assert public_surface(tmp_path / "a.py")[0] == {"create_model"}
    (tmp_path / "b.py").write_text("import keras\nfrom torch import nn\n")
    assert framework_imports(tmp_path / "b.py") == {"torch"}
