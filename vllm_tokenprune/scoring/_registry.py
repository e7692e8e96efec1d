"""Method registry and option validation (pure Python, no vLLM; every process).

Every method module defines a frozen dataclass of options whose fields are declared with
:func:`option` (default, one-line doc, optional bounds) and registers itself with
:func:`register_method`. The registry is the single source of truth for ``list_methods()``,
each method's *stage* (:data:`INPUT`: drops tokens before the language model, a scorer; or
:data:`LAYER`: acts inside the language model, ``alvts``), its wire id (:func:`wire_id`), option
defaults, option docs (``METHOD_OPTIONS`` / :func:`method_options`) and option validation
(:func:`validate_options`), which the vLLM integration uses to check server configuration before
any request arrives and to decide, per item, what happens to its tokens.

Third-party methods: a package declares an entry point in the group :data:`ENTRY_POINT_GROUP`
(``vllm_tokenprune.methods``) whose object is a callable taking no argument that registers its
methods with :func:`register_method` (docs/scorers.md, "Write your own method"). They are loaded
by the vLLM plugin in every process before the server's configuration is validated
(:func:`load_entry_points`), and lazily on the first use of the registry anywhere else, so that
``list_methods()`` shows them in a plain Python session.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import re
import threading
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from torch import Tensor

from vllm_tokenprune.log import logger_name
from vllm_tokenprune.scoring._common import Batch

__all__ = [
    "ENTRY_POINT_GROUP",
    "INPUT",
    "LAYER",
    "METHOD_OPTIONS",
    "MethodSpec",
    "NoOptions",
    "OptionInfo",
    "get_method",
    "list_methods",
    "load_entry_points",
    "method_options",
    "option",
    "register_method",
    "validate_options",
    "wire_id",
]

ScorerFn = Callable[[Batch, Any], list[Tensor]]

#: Stages: an input-side method drops tokens before the language model (a scorer: the prompt's
#: placeholder count is the kept count); a layer method keeps every token in the prompt and acts
#: inside the language model's decoder layers (``alvts``: layers skip rows).
INPUT = "input"
LAYER = "layer"
STAGES = (INPUT, LAYER)
#: Entry-point group of third-party methods (each entry point: a callable that registers).
ENTRY_POINT_GROUP = "vllm_tokenprune.methods"
#: Method names: what a metric label, a JSON string and a URL segment all carry unchanged.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")

# Under vLLM's logger namespace, so the server log shows these lines (vllm_tokenprune.log).
_logger = logging.getLogger(logger_name(__name__))

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
    """A registered method.

    ``stage``: :data:`INPUT` (``fn(batch, opts) -> indices``, a scorer) or :data:`LAYER`
    (``fn(opts, num_layers) -> int``: how many of the language model's decoder layers it acts
    on, which the response field and metrics report; the model side is a mixin of the families
    that serve it, see :mod:`vllm_tokenprune.alvts`). ``batched_kind`` tells how items of one
    call are processed: ``"padded"`` (one padded batch of tensor ops), ``"padded-greedy"`` (one
    greedy loop over steps, every step a batched op over all items), ``"index-only"`` (indices
    depend on shapes only). ``wire_id``: the method's id in the per-item params row
    (:func:`wire_id`); ``module``: where ``fn`` is defined.
    """

    name: str
    fn: Callable[..., Any]
    options_cls: type
    summary: str
    batched_kind: str
    uses_text: bool
    uses_grid: bool
    stage: str = INPUT
    wire_id: int = 0
    module: str = ""

    @property
    def greedy(self) -> bool:
        """One sequential step per kept token: cost grows with the keep-count (see
        ``token_prune.max_greedy_keep``)."""
        return self.batched_kind == "padded-greedy"


_REGISTRY: dict[str, MethodSpec] = {}


@dataclass(frozen=True)
class NoOptions:
    """This method has no options."""


def wire_id(name: str) -> int:
    """The method's id in the per-item params row: 31 bits of the SHA-256 of its name.

    A pure function of the name, so the id is the same in every process and on every node
    whatever else is installed and in whichever order methods were registered (two names with
    the same id are refused at registration)."""
    digest = hashlib.sha256(f"vllm-tokenprune method {name}".encode()).digest()
    return int.from_bytes(digest[:4], "big") >> 1


def register_method(
    name: str,
    *,
    options: type = NoOptions,
    summary: str = "",
    batched_kind: str = "padded",
    uses_text: bool = False,
    uses_grid: bool = False,
    stage: str = INPUT,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator registering a method under ``name``.

    Input stage (the default, a scorer): ``fn(batch: Batch, opts) -> list[LongTensor]`` receives
    a validated :class:`Batch` (all items on one device, same width, every ``num_keep < N``) and
    an instance of ``options`` (a frozen dataclass whose fields are declared with
    :func:`option`; default: no options); it returns one ascending int64 index tensor per item.
    ``uses_text``: the method reads the prompt's text embeddings (``batch.text_embeds``);
    ``uses_grid``: it reads the items' ``(t, h, w)`` token grids.

    Layer stage: ``fn(opts, num_layers) -> int``, see :class:`MethodSpec`.

    Raises ValueError for a name that is not 1-64 letters, digits, ``_``, ``.`` or ``-`` (first
    a letter or digit), an unknown stage, a different function under an existing name, or a
    name whose :func:`wire_id` another method already has.
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"method name {name!r}: use 1-64 letters, digits, '_', '.' or '-', "
                         "starting with a letter or digit")
    if stage not in STAGES:
        raise ValueError(f"method {name!r}: stage must be one of {STAGES}, got {stage!r}")
    if not dataclasses.is_dataclass(options):
        raise TypeError("options must be a dataclass type")

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        with _lock:
            if name in _REGISTRY and _REGISTRY[name].fn is not fn:
                raise ValueError(f"scoring method {name!r} is already registered "
                                 f"(by {_REGISTRY[name].module})")
            ident = wire_id(name)
            clash = next((s.name for s in _REGISTRY.values()
                          if s.wire_id == ident and s.name != name), None)
            if clash is not None:
                raise ValueError(f"method {name!r} has the wire id of the registered method "
                                 f"{clash!r}; rename one of them")
            _REGISTRY[name] = MethodSpec(name, fn, options, summary, batched_kind, uses_text,
                                         uses_grid, stage, ident,
                                         getattr(fn, "__module__", "") or "")
        return fn

    return deco


_lock = threading.RLock()
#: Entry points loaded (or failed) in this process: name -> None or the error.
_entry_points: dict[str, BaseException | None] | None = None


def load_entry_points(strict: bool = False) -> dict[str, BaseException | None]:
    """Load every installed ``vllm_tokenprune.methods`` entry point once per process and call
    it (it registers its methods). Returns ``{entry point: None or the error}``.

    ``strict`` (the vLLM plugin): an entry point that fails raises RuntimeError naming it, so a
    server never starts without a method it was installed with. Otherwise (the lazy load on
    first use of the registry) a failure is logged and the other methods stay usable.
    """
    global _entry_points
    with _lock:
        if _entry_points is None:
            _entry_points = {}
            from importlib.metadata import entry_points

            for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
                label = f"{ep.name} = {ep.value}"
                try:
                    ep.load()()
                    _entry_points[label] = None
                except Exception as e:  # noqa: BLE001 - reported below, never half-silent
                    _entry_points[label] = e
                    _logger.warning("vllm-tokenprune: the method entry point %r "
                                    "(group %s) failed: %s: %s", label, ENTRY_POINT_GROUP,
                                    type(e).__name__, e)
        failed = {k: e for k, e in _entry_points.items() if e is not None}
    if strict and failed:
        label, error = next(iter(failed.items()))
        raise RuntimeError(
            f"vllm-tokenprune: the method entry point {label!r} (group {ENTRY_POINT_GROUP}) "
            f"failed: {type(error).__name__}: {error}; fix or uninstall the package that "
            "declares it") from error
    return dict(_entry_points)


def _registry() -> dict[str, MethodSpec]:
    """The registry, with the installed entry points loaded (first use)."""
    if _entry_points is None:
        load_entry_points()
    return _REGISTRY


def list_methods(stage: str | None = INPUT) -> list[str]:
    """Sorted names of the registered methods of ``stage`` (default: the input-side scorers,
    what :func:`select_tokens` runs; ``None``: every stage, input-side first)."""
    reg = _registry()
    if stage is None:
        return [*list_methods(INPUT), *list_methods(LAYER)]
    return sorted(n for n, s in reg.items() if s.stage == stage)


def get_method(name: str, stage: str | None = None) -> MethodSpec:
    """The :class:`MethodSpec` registered as ``name`` (of ``stage``, if given); ValueError
    listing the known ones."""
    reg = _registry()
    if not isinstance(name, str) or name not in reg:
        raise ValueError(
            f"unknown scoring method {name!r}; known methods: {', '.join(list_methods())}"
        )
    spec = reg[name]
    if stage is not None and spec.stage != stage:
        where = "inside the language model" if spec.stage == LAYER else "on the input"
        raise ValueError(
            f"method {name!r} acts {where} (stage {spec.stage!r}), not at stage {stage!r}; "
            f"input-side methods: {', '.join(list_methods())}")
    return spec


class _MethodOptions(Mapping[str, type]):
    """Read-only live view ``{method name: options dataclass}`` over the registry."""

    def __getitem__(self, key: str) -> type:
        return get_method(key).options_cls

    def __iter__(self):  # type: ignore[override]
        return iter(list_methods())

    def __len__(self) -> int:
        return len(list_methods())

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
