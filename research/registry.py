"""One registry helper for every name-to-implementation table in slimjax.

Stages, models, data sets, samplers, acquisitions, pruning scorers, KD terms, observers, export
formats, ... are each a :class:`Registry`: ``register`` refuses a taken name (unless it is the same
definition again, as when a notebook cell or a config module is run twice), ``get`` names the
registered entries and the closest match when a name is unknown, and ``names`` lists them so
conformance tests can iterate every implementation without being edited.

An entry can also be *declared* before its module is imported: ``register_lazy(name,
"module:attr")`` makes the name known to ``names()``, ``in`` and the did-you-mean errors without
importing anything, and ``get`` imports ``module`` on first use. So a registry created in a
standard-library module, with its built-in names declared there, lets ``slimjax`` check a
config's names before JAX loads; the module that defines the entries registers them as usual
when it is imported, which fulfils the declarations.

Example::

    SCORERS: Registry[ScoreFn] = Registry("pruning scorer", hint="register one with @register_scorer('name')")

    @SCORERS.register("magnitude")
    def magnitude(params, grads=None): ...

    SCORERS.get("magnitud")  # UnknownNameError: unknown pruning scorer 'magnitud'; did you mean 'magnitude'? ...

Standard library only, so config validation can use it before JAX is imported.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import re
import sys
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


class LazyTargetError(ImportError):
    """A declared entry (:meth:`Registry.register_lazy`) whose ``module:attr`` cannot be imported."""


_TARGET = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


@dataclasses.dataclass(frozen=True)
class Declared:
    """A declared entry, imported on first :meth:`Registry.get`: ``"module:attr"``."""

    target: str

    @property
    def module(self) -> str:
        return self.target.partition(":")[0]

    @property
    def attr(self) -> str:
        return self.target.partition(":")[2]


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


def _fulfils(lazy: Declared, obj: Any) -> bool:
    """Whether registering ``obj`` fulfils the declaration ``lazy``: ``obj`` is what the target
    names, or it comes from the target's module while that module is imported (a record wrapping
    the function, as scorers are registered)."""
    ident = _identity(obj)
    if ident == (lazy.module, lazy.attr):
        return True
    if ident is not None and ident[0] != lazy.module:
        return False
    return lazy.module in sys.modules


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
        self._entries: dict[str, Any] = {}  # name -> entry, or a Declared placeholder
        self._declared: dict[str, str] = {}  # name -> "module:attr" of every declaration
        self._overridden: set[str] = set()  # declared names registered with replace=True

    @overload
    def register(self, name: str) -> Callable[[T], T]: ...

    @overload
    def register(self, name: str, obj: T, *, replace: bool = False) -> T: ...

    def register(self, name: str, obj: Any = None, *, replace: bool = False) -> Any:
        """Adds ``obj`` under ``name``; without ``obj`` returns a decorator.

        Registering the same definition again (same object, or same module and qualified name, as
        when a notebook cell or a config file runs twice) takes the newer object and is not an
        error. A different implementation under a taken name raises :class:`DuplicateNameError`
        unless ``replace=True``. An override of a declared name (:meth:`register_lazy`) stays when
        the declared module is imported later and registers its own entry.
        """
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {self.what} name must be a non-empty string, got {name!r}")
        if obj is None:

            def deco(o: T) -> T:
                return self.register(name, o, replace=replace)

            return deco
        old = self._entries.get(name)
        if replace and name in self._declared:
            self._overridden.add(name)
        elif name in self._overridden and _fulfils(Declared(self._declared[name]), obj):
            return obj  # the declared module registering the entry that was overridden on purpose
        if isinstance(old, Declared) and not replace:
            if not _fulfils(old, obj):
                raise DuplicateNameError(
                    f"{self.what} {name!r} is declared for {old.target}, which registers it when imported; "
                    f"pick another name, or pass replace=True to override it on purpose"
                )
            self._entries[name] = obj
            return obj
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

    def register_lazy(self, name: str, target: str) -> None:
        """Declares ``name`` as the entry ``target`` (``"package.module:attr"``) without importing it.

        The name is listed by :meth:`names`, found by ``in`` and suggested by the unknown-name
        error at once; :meth:`get` imports ``package.module`` on first use and returns what that
        import registered under ``name`` (the module registers its entries as usual), or else
        ``attr`` of the module. Registering from ``target``'s module (the object ``attr`` names,
        or any object while that module is being imported: a record wrapping it) fulfils the
        declaration; anything else under the name is refused like a duplicate. Declaring the same
        target again is a no-op.

        Raises:
          ValueError: ``target`` is not of the form ``"module:attr"``.
          DuplicateNameError: ``name`` is declared for another target, or registered to an
            object that ``target`` does not name.
        """
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {self.what} name must be a non-empty string, got {name!r}")
        if not isinstance(target, str) or not _TARGET.match(target):
            raise ValueError(
                f"register_lazy({name!r}, {target!r}): the target must be 'package.module:attr', "
                "e.g. 'mypkg.scores:my_scorer'"
            )
        lazy = Declared(target)
        old = self._entries.get(name)
        if old is None:
            self._entries[name] = lazy
        elif isinstance(old, Declared):
            if old != lazy:
                raise DuplicateNameError(f"{self.what} {name!r} is already declared for {old.target}, not {target}")
        elif not _fulfils(lazy, old):
            where = ".".join(_identity(old) or (type(old).__module__, type(old).__qualname__))
            raise DuplicateNameError(f"{self.what} {name!r} is already registered (by {where}), not {target}")
        self._declared[name] = target

    def unregister(self, name: str) -> None:
        """Removes ``name`` and its declaration (tests that register temporary entries clean up with this)."""
        self._entries.pop(name, None)
        self._declared.pop(name, None)
        self._overridden.discard(name)

    def get(self, name: str) -> T:
        """The entry registered under ``name``, importing its module first if it was only declared.

        Raises:
          UnknownNameError: naming the unknown name, the closest registered one and all of them.
          LazyTargetError: a declared entry whose ``module:attr`` cannot be imported (an
            ``ImportError`` naming the target and the reason).
        """
        try:
            entry = self._entries[name]
        except (KeyError, TypeError):
            raise UnknownNameError(self.unknown_message(name)) from None
        if isinstance(entry, Declared):
            return self._load(name, entry)
        return entry

    def _load(self, name: str, lazy: Declared) -> T:
        """Imports a declared entry's module; its registration (or else ``attr``) becomes the entry."""
        try:
            module = importlib.import_module(lazy.module)
        except ImportError as e:
            raise LazyTargetError(
                f"{self.what} {name!r} is declared as {lazy.target}, but importing {lazy.module} failed: "
                f"{type(e).__name__}: {e}"
            ) from e
        except Exception as e:
            e.add_note(f"(raised while importing {lazy.target}, declared as {self.what} {name!r})")
            raise
        entry = self._entries.get(name)
        if entry is not None and not isinstance(entry, Declared):
            return entry  # the module registered it on import
        obj: Any = module
        for part in lazy.attr.split("."):
            if not hasattr(obj, part):
                raise LazyTargetError(
                    f"{self.what} {name!r} is declared as {lazy.target}, but {lazy.module} has no attribute "
                    f"{lazy.attr!r}; fix the declaration (register_lazy) or define it"
                )
            obj = getattr(obj, part)
        self._entries[name] = obj
        return obj

    def loaded(self, name: str) -> T | None:
        """The entry registered under ``name`` without importing anything: ``None`` when the name is
        unknown or only declared (registration decorators that compare with an earlier entry use this)."""
        entry = self._entries.get(name)
        return None if isinstance(entry, Declared) else entry

    def pending(self) -> dict[str, str]:
        """``{name: "module:attr"}`` of the entries declared but not imported yet."""
        return {n: e.target for n, e in sorted(self._entries.items()) if isinstance(e, Declared)}

    def declared(self) -> dict[str, str]:
        """``{name: "module:attr"}`` of every declaration made (imported or not), for conformance tests."""
        return dict(sorted(self._declared.items()))

    def unknown_message(self, name: Any) -> str:
        """The message :meth:`get` raises for an unknown ``name`` (for callers that raise their own type)."""
        names = self.names()
        msg = f"unknown {self.what} {name!r};{did_you_mean(name, names)} registered: {names}"
        return f"{msg}; {self.hint}" if self.hint else msg

    def names(self) -> list[str]:
        """Registered names, declared ones included (nothing is imported), sorted."""
        return sorted(self._entries)

    def items(self) -> list[tuple[str, T]]:
        """``(name, entry)`` pairs, sorted by name (declared entries are imported first)."""
        return [(name, self.get(name)) for name in self.names()]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.what!r}, {self.names()})"
