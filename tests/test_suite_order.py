"""The suite's own scheduling: the files with slow tests reach the xdist workers first."""
from types import SimpleNamespace

from conftest import heavy_files_first


def _item(nodeid: str, slow: bool = False):
    return SimpleNamespace(nodeid=nodeid, get_closest_marker=lambda name: object() if slow and name == "slow" else None)


def test_files_with_the_most_slow_tests_come_first_and_each_file_keeps_its_order():
    items = [_item("tests/test_a.py::one"), _item("tests/test_a.py::two"),
             _item("tests/test_b.py::one", slow=True), _item("tests/test_b.py::two"),
             _item("tests/test_c.py::one", slow=True), _item("tests/test_c.py::two[x]", slow=True),
             _item("tests/test_d.py::one")]
    ordered = [item.nodeid for item in heavy_files_first(items)]
    assert ordered == ["tests/test_c.py::one", "tests/test_c.py::two[x]", "tests/test_b.py::one",
                       "tests/test_b.py::two", "tests/test_a.py::one", "tests/test_a.py::two", "tests/test_d.py::one"]
