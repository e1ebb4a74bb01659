"""One registry helper for every name-to-implementation table in slimjax.

Stages, models, data sets, samplers, acquisitions, pruning scorers, KD terms, observers, export
formats, ... are each a :class:`Registry`: ``register`` refuses a taken name (unless it is the same
definition again, as when a notebook cell or a config module is run twice), ``get`` names the
registered entries and the closest match when a name is unknown, and ``names`` lists them so
conformance tests can iterate every implementation without being edited.

Example::

    SCORERS: Registry[ScoreFn] = Registry("pruning scorer", hint="register one with @register_scorer('name')")

    @SCORERS.register("magnitude")
    def magnitude(params, grads=None): ...

    SCORERS.get("magnitud")  # UnknownNameError: unknown pruning scorer 'magnitud'; did you mean 'magnitude'? ...

Standard library only, so config validation can use it before JAX is imported.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from collections.abc import Iterator
from typing import Any
from typing import Generic
from typing import TypeVar
from typing import overload

T = TypeVar("T")


class UnknownNameError(KeyError, ValueError):
    """A name that is not registered. A ``KeyError`` (lookup) and a ``ValueError`` (bad value)."""

    def __str__(self) -> str:  # KeyError would print the message in quotes.
        return str(self.args[0]) if self.args else ""


class DuplicateNameError(ValueError):
    """A different implementation registered under a name that is already taken."""


def _identity(obj: Any) -> tuple[str, str] | None:
    """Where ``obj`` was defined (module, qualified name), or None for objects without a definition site."""
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if module is None or qualname is None:
        return None
    return (module, qualname)


def same_definition(a: Any, b: Any) -> bool:
    """Whether ``a`` and ``b`` are the same object or the same definition (module and qualified name).

    For registries whose entries wrap a function (a scorer record, a ``(config class, run
    function)`` pair): re-registering a wrapper around the same definition passes ``replace=``
    this, so a module run twice is a no-op while a different function is still refused.
    """
    return a is b or (_identity(a) is not None and _identity(a) == _identity(b))


def did_you_mean(name: str, choices: list[str] | tuple[str, ...]) -> str:
    """``" did you mean 'x'?"`` for the closest of ``choices``, or ``""`` when none is close."""
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" did you mean {close[0]!r}?" if close else ""


class Registry(Generic[T]):
    """A named table of implementations (functions, classes or objects) of one kind.

    Args:
      what: what an entry is, for messages (``"sampler"``, ``"KD term"``).
      hint: how to add one, appended to the unknown-name error
        (``"register one with @register_sampler('name')"``).
    """

    def __init__(self, what: str, *, hint: str = "") -> None:
        self.what = what
        self.hint = hint
        self._entries: dict[str, T] = {}

    @overload
    def register(self, name: str) -> Callable[[T], T]: ...

    @overload
    def register(self, name: str, obj: T, *, replace: bool = False) -> T: ...

    def register(self, name: str, obj: Any = None, *, replace: bool = False) -> Any:
        """Adds ``obj`` under ``name``; without ``obj`` returns a decorator.

        Registering the same definition again (same object, or same module and qualified name, as
        when a notebook cell or a config file runs twice) takes the newer object and is not an
        error. A different implementation under a taken name raises :class:`DuplicateNameError`
        unless ``replace=True``.
        """
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {self.what} name must be a non-empty string, got {name!r}")
        if obj is None:

            def deco(o: T) -> T:
                return self.register(name, o, replace=replace)

            return deco
        old = self._entries.get(name)
        if old is not None and not replace and old is not obj:
            same = _identity(old) is not None and _identity(old) == _identity(obj)
            if not same:
                where = ".".join(_identity(old) or (type(old).__module__, type(old).__qualname__))
                raise DuplicateNameError(
                    f"{self.what} {name!r} is already registered (by {where}); pick another name, "
                    f"or pass replace=True to override it on purpose"
                )
        self._entries[name] = obj
        return obj

    def unregister(self, name: str) -> None:
        """Removes ``name`` (tests that register temporary entries clean up with this)."""
        self._entries.pop(name, None)

    def get(self, name: str) -> T:
        """The entry registered under ``name``.

        Raises:
          UnknownNameError: naming the unknown name, the closest registered one and all of them.
        """
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise UnknownNameError(self.unknown_message(name)) from None

    def unknown_message(self, name: Any) -> str:
        """The message :meth:`get` raises for an unknown ``name`` (for callers that raise their own type)."""
        names = self.names()
        msg = f"unknown {self.what} {name!r};{did_you_mean(name, names)} registered: {names}"
        return f"{msg}; {self.hint}" if self.hint else msg

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._entries)

    def items(self) -> list[tuple[str, T]]:
        """``(name, entry)`` pairs, sorted by name."""
        return sorted(self._entries.items())

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.what!r}, {self.names()})"
