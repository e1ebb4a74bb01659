"""research.registry: duplicate refusal, idempotent re-registration, did-you-mean errors."""

import pytest

from research.registry import DuplicateNameError
from research.registry import Registry
from research.registry import UnknownNameError


def _make():
    reg = Registry("widget", hint="register one with @WIDGETS.register('name')")

    @reg.register("alpha")
    def alpha():
        return 1

    reg.register("beta", lambda: 2)
    return reg, alpha


def test_register_get_and_list():
    reg, alpha = _make()
    assert reg.get("alpha") is alpha
    assert reg.names() == ["alpha", "beta"]
    assert list(reg) == ["alpha", "beta"] and len(reg) == 2 and "beta" in reg and "gamma" not in reg
    assert [n for n, _ in reg.items()] == ["alpha", "beta"]


def test_unknown_name_suggests_the_closest_and_lists_all():
    reg, _ = _make()
    with pytest.raises(UnknownNameError) as e:
        reg.get("alpah")
    msg = str(e.value)
    assert "unknown widget 'alpah'" in msg and "did you mean 'alpha'?" in msg
    assert "['alpha', 'beta']" in msg and "@WIDGETS.register" in msg
    assert isinstance(e.value, KeyError) and isinstance(e.value, ValueError)
    with pytest.raises(UnknownNameError, match="unknown widget 'zzz'; registered"):
        reg.get("zzz")


def test_a_different_implementation_under_a_taken_name_is_refused():
    reg, _ = _make()

    def other():
        return 3

    with pytest.raises(DuplicateNameError, match="widget 'alpha' is already registered.*replace=True"):
        reg.register("alpha", other)
    assert reg.get("alpha")() == 1
    reg.register("alpha", other, replace=True)
    assert reg.get("alpha") is other


def test_the_same_definition_again_is_not_an_error():
    reg, alpha = _make()
    reg.register("alpha", alpha)  # the same object
    namespace: dict = {}
    src = "def alpha():\n    return 10\n"
    exec(compile(src, "<cell>", "exec"), {"__name__": __name__}, namespace)  # a re-run notebook cell
    namespace["alpha"].__qualname__ = alpha.__qualname__
    reg.register("alpha", namespace["alpha"])
    assert reg.get("alpha")() == 10


def test_bad_names_and_unregister():
    reg, _ = _make()
    with pytest.raises(ValueError, match="non-empty string"):
        reg.register("", lambda: 0)
    reg.unregister("beta")
    assert reg.names() == ["alpha"]
