"""One pass shape: a kebab-case name, a one-line docstring, a pydantic Options model, ``run -> PassResult``.

The registry is the only list of passes. Built-in passes register themselves when ``llmc.passes`` is
imported; installed packages contribute passes through the ``llmc.passes`` entry-point group; a spec may
also name a class directly as ``my_pkg.module:MyPass``.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import logging
import pkgutil
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError

from llmc.errors import LlmcError
from llmc.ir import Graph

log = logging.getLogger("llmc.passes")

_KEBAB = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")


class PassOptions(BaseModel):
    """Base of every pass's options: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


@dataclass
class PassResult:
    """What a pass reports: whether it changed the graph, and counters for the report (``fused: 30``)."""

    changed: bool
    stats: dict[str, int | float] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)  # JSON-able, e.g. rejected fusion sites and why


@dataclass
class PassContext:
    """What passes may read besides the graph: the target being compiled for and shared data.

    Observation (timing, dumps, verification) is not here: it belongs to instruments.
    """

    target: str | None = None
    data: dict[str, Any] = field(default_factory=dict)
    log: logging.Logger = log


class Pass:
    """Base class. Subclasses set ``Options`` and implement ``run``; ``@register_pass`` sets ``name``."""

    name: ClassVar[str] = ""
    Options: ClassVar[type[PassOptions]] = PassOptions

    def __init__(self, options: PassOptions | dict[str, Any] | None = None) -> None:
        if isinstance(options, PassOptions):
            self.options = options
        else:
            self.options = self.Options.model_validate(options or {})

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def summary(cls) -> str:
        """The first line of the docstring: what the pass rewrites into what."""
        doc = (cls.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""

    def describe(self) -> str:
        opts = self.options.model_dump(exclude_defaults=True)
        return self.name if not opts else f"{self.name}{opts}"


class UnknownPassError(LlmcError):
    """A pipeline names a pass that is not registered (with a did-you-mean suggestion)."""


class PassOptionsError(LlmcError):
    """A pass's options do not validate; ``errors`` are pydantic's, with option paths."""

    def __init__(self, pass_name: str, errors: list[dict[str, Any]]):
        self.pass_name = pass_name
        self.errors = errors
        text = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '<options>'}: {e['msg']}" for e in errors)
        super().__init__(f"invalid options for pass '{pass_name}': {text}")


_REGISTRY: dict[str, type[Pass]] = {}
_LOADED = False


def register_pass(name: str):
    """Class decorator: ``@register_pass("fold-constants")``."""

    if not _KEBAB.match(name):
        raise ValueError(f"pass names are kebab-case, got {name!r}")

    def wrap(cls: type[Pass]) -> type[Pass]:
        existing = _REGISTRY.get(name)
        if existing is not None and existing is not cls and existing.__qualname__ != cls.__qualname__:
            raise ValueError(
                f"pass '{name}' is registered twice ({existing.__module__} and {cls.__module__})"
            )
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def load_builtin_passes() -> None:
    """Import every module under llmc.passes and llmc.targets (they register on import), then entry points."""
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    for package_name in ("llmc.passes", "llmc.targets"):
        package = importlib.import_module(package_name)
        for info in pkgutil.walk_packages(package.__path__, prefix=f"{package_name}."):
            importlib.import_module(info.name)
    for entry in importlib.metadata.entry_points(group="llmc.passes"):
        try:
            obj = entry.load()
        except Exception as exc:  # a broken plugin must not take the compiler down
            log.warning("could not load pass plugin %s: %s", entry.value, exc)
            continue
        if isinstance(obj, type) and issubclass(obj, Pass) and obj.name and obj.name not in _REGISTRY:
            _REGISTRY[obj.name] = obj


def registered_passes() -> dict[str, type[Pass]]:
    load_builtin_passes()
    return dict(sorted(_REGISTRY.items()))


def get_pass_class(name: str) -> type[Pass]:
    """Find a pass by registered name, or import ``module:Class`` for a custom pass."""
    load_builtin_passes()
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise UnknownPassError(f"cannot import custom pass module '{module_name}': {exc}") from exc
        cls = getattr(module, attr, None)
        from llmc.rewrite import RewriteRule, RuleSet, pass_from_rules

        if isinstance(cls, RuleSet | RewriteRule):
            return pass_from_rules(cls, re.sub(r"[^a-z0-9]+", "-", attr.lower()).strip("-") or "user-rules")
        if not (isinstance(cls, type) and issubclass(cls, Pass)):
            raise UnknownPassError(f"'{name}' is neither a Pass subclass nor a rewrite RuleSet/RewriteRule")
        if not cls.name:
            cls.name = re.sub(r"(?<!^)(?=[A-Z])", "-", attr).lower()
        return cls
    cls = _REGISTRY.get(name)
    if cls is None:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=1, cutoff=0.6)
        hint = f"did you mean '{close[0]}'?" if close else "run `llmc passes` to list the registered passes"
        raise UnknownPassError(f"unknown pass '{name}'", hint=hint)
    return cls


def make_pass(name: str, options: dict[str, Any] | None = None) -> Pass:
    cls = get_pass_class(name)
    try:
        return cls(options)
    except ValidationError as exc:
        raise PassOptionsError(cls.name, exc.errors()) from exc
