"""Lazy package exports: names resolve to the same object whatever was imported first."""

import subprocess
import sys

import pytest

# Each order imports the same-named submodule before or after the package's export.
_ORDERS = {
    "submodule_first": "import research.automl.hypervolume\nfrom research.automl import hypervolume",
    "export_first": "from research.automl import hypervolume\nimport research.automl.hypervolume",
    "from_submodule_first": "from research.automl.hypervolume import pareto_mask\nfrom research.automl import hypervolume",
}


@pytest.mark.parametrize("order", sorted(_ORDERS))
def test_exported_function_named_like_its_submodule_survives_any_import_order(order):
    script = _ORDERS[order] + (
        "\nimport research.automl as a, sys\n"
        "assert callable(hypervolume), type(hypervolume)\n"
        "assert a.hypervolume is hypervolume\n"
        "assert sys.modules['research.automl.hypervolume'].hypervolume is hypervolume\n"
        "print(hypervolume([[1.0, 2.0], [2.0, 1.0]], [3.0, 3.0]))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout) == pytest.approx(3.0)


def test_unknown_name_raises_attribute_error_naming_the_package():
    import research.automl

    with pytest.raises(AttributeError, match="research.automl.*no_such_name"):
        research.automl.no_such_name  # noqa: B018


def test_dir_lists_exports_and_hides_the_bookkeeping():
    import research.automl

    names = dir(research.automl)
    assert "Study" in names and "hypervolume" in names
    assert "_lazy_exports" not in names
