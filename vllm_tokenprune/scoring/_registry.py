"""Method registry and option validation.

Every scorer module defines a frozen dataclass of options whose fields are declared with
:func:`option` (default, one-line doc, optional bounds/choices) and registers its batched
implementation with :func:`register_method`. The registry is the single source of truth for
``list_methods()``, option defaults, option docs (``METHOD_OPTIONS`` / :func:`method_options`)
and option validation (:func:`validate_options`), which the vLLM integration uses to check server
configuration before any request arrives.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from torch import Tensor

from vllm_tokenprune.scoring._common import Batch

__all__ = [
    "METHOD_OPTIONS",
    "MethodSpec",
    "NoOptions",
    "OptionInfo",
    "get_method",
    "list_methods",
    "method_options",
    "option",
    "register_method",
    "validate_options",
]

ScorerFn = Callable[[Batch, Any], list[Tensor]]

_MISSING = object()


def option(
    default: Any,
    doc: str,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
) -> Any:
    """Declare an option field: default, documentation and numeric bounds (checked on
    validation; ``None`` values skip the bounds)."""
    bounds = {"ge": ge, "gt": gt, "le": le, "lt": lt}
    return field(default=default, metadata={"doc": doc, **bounds})


@dataclass(frozen=True)
class OptionInfo:
    """Public description of one option."""

    name: str
    type: str
    default: Any
    doc: str


@dataclass(frozen=True)
class MethodSpec:
    """A registered scorer.

    ``batched_kind`` tells how items of one call are processed: ``"padded"`` (one padded batch of
    tensor ops), ``"padded-greedy"`` (one greedy loop over steps, every step a batched op over
    all items), ``"index-only"`` (indices depend on shapes only).
    """

    name: str
    fn: ScorerFn
    options_cls: type
    summary: str
    batched_kind: str
    uses_text: bool
    uses_grid: bool

    @property
    def greedy(self) -> bool:
        """One sequential step per kept token: cost grows with the keep-count (see
        ``token_prune.max_greedy_keep``)."""
        return self.batched_kind == "padded-greedy"


_REGISTRY: dict[str, MethodSpec] = {}


@dataclass(frozen=True)
class NoOptions:
    """This method has no options."""


def register_method(
    name: str,
    *,
    options: type = NoOptions,
    summary: str = "",
    batched_kind: str = "padded",
    uses_text: bool = False,
    uses_grid: bool = False,
) -> Callable[[ScorerFn], ScorerFn]:
    """Decorator registering ``fn(batch: Batch, opts) -> list[LongTensor]`` under ``name``.

    ``fn`` receives a validated :class:`Batch` (all items on one device, same width, every
    ``num_keep < N``) and an instance of ``options`` (a frozen dataclass whose fields are declared
    with :func:`option`; default: no options); it returns one ascending int64 index tensor per
    item. Re-registering a different function under an existing name raises ValueError.
    """
    if not dataclasses.is_dataclass(options):
        raise TypeError("options must be a dataclass type")

    def deco(fn: ScorerFn) -> ScorerFn:
        if name in _REGISTRY and _REGISTRY[name].fn is not fn:
            raise ValueError(f"scoring method {name!r} is already registered")
        _REGISTRY[name] = MethodSpec(name, fn, options, summary, batched_kind, uses_text, uses_grid)
        return fn

    return deco


def list_methods() -> list[str]:
    """Sorted names of the registered scoring methods."""
    return sorted(_REGISTRY)


def get_method(name: str) -> MethodSpec:
    """The :class:`MethodSpec` registered as ``name``; ValueError listing the known ones."""
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(
            f"unknown scoring method {name!r}; known methods: {', '.join(list_methods())}"
        )
    return _REGISTRY[name]


class _MethodOptions(Mapping[str, type]):
    """Read-only live view ``{method name: options dataclass}`` over the registry."""

    def __getitem__(self, key: str) -> type:
        return get_method(key).options_cls

    def __iter__(self):  # type: ignore[override]
        return iter(list_methods())

    def __len__(self) -> int:
        return len(_REGISTRY)

    def __repr__(self) -> str:
        return f"METHOD_OPTIONS({', '.join(list_methods())})"


METHOD_OPTIONS: Mapping[str, type] = _MethodOptions()


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(hint))
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "None"
    return getattr(hint, "__name__", str(hint))


def method_options(name: str) -> dict[str, OptionInfo]:
    """Documented options of a method, in declaration order: name, type, default, doc."""
    cls = get_method(name).options_cls
    hints = typing.get_type_hints(cls, include_extras=False)
    return {
        f.name: OptionInfo(f.name, _type_name(hints[f.name]), f.default, f.metadata.get("doc", ""))
        for f in dataclasses.fields(cls)
    }


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Accept ``value`` for type ``hint`` (ints for floats; nothing else is converted)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arg in typing.get_args(hint):
            try:
                return _coerce(value, arg, where)
            except ValueError as exc:
                errors.append(str(exc))
        raise ValueError(f"{where} must be {_type_name(hint)}, got {value!r}")
    if origin is Literal:
        if value in typing.get_args(hint) and isinstance(value, str):
            return value
        raise ValueError(f"{where} must be one of {_type_name(hint)}, got {value!r}")
    if hint is type(None):
        if value is None:
            return None
    elif hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return int(value)
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - only the types above are used by the scorers
        raise TypeError(f"unsupported option type {hint!r}")
    raise ValueError(f"{where} must be {_type_name(hint)}, got {type(value).__name__} {value!r}")


def _check_bounds(value: Any, meta: Mapping[str, Any], where: str) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    ge, gt, le, lt = meta.get("ge"), meta.get("gt"), meta.get("le"), meta.get("lt")
    if ge is not None and not value >= ge:
        raise ValueError(f"{where} must be >= {ge}, got {value!r}")
    if gt is not None and not value > gt:
        raise ValueError(f"{where} must be > {gt}, got {value!r}")
    if le is not None and not value <= le:
        raise ValueError(f"{where} must be <= {le}, got {value!r}")
    if lt is not None and not value < lt:
        raise ValueError(f"{where} must be < {lt}, got {value!r}")


def make_options(method: str, options: Mapping[str, Any] | None) -> Any:
    """Validated options dataclass instance of ``method`` (defaults for missing keys)."""
    spec = get_method(method)
    cls = spec.options_cls
    options = dict(options or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(k for k in options if k not in fields)
    if unknown:
        valid = ", ".join(fields) or "(none)"
        raise ValueError(
            f"unknown option(s) {', '.join(map(repr, unknown))} for method {method!r}; "
            f"valid options: {valid}"
        )
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in options.items():
        where = f"option {key!r} of method {method!r}"
        coerced = _coerce(value, hints[key], where)
        _check_bounds(coerced, fields[key].metadata, where)
        values[key] = coerced
    try:
        return cls(**values)
    except ValueError as exc:
        raise ValueError(f"method {method!r}: {exc}") from None


def validate_options(method: str, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Check ``options`` for ``method`` and return the complete option dict (defaults filled in).

    Raises ValueError for an unknown method, an unknown key (naming it), a wrong type or a value
    out of range.
    """
    return dataclasses.asdict(make_options(method, options))
