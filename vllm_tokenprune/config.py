"""The ``token_prune`` block of a served model, and the per-request pruning fields.

Server side, the block arrives through vLLM's own ``--hf-overrides``::

    --hf-overrides '{"architectures": ["TokenPruneQwen2_5_VLForConditionalGeneration"],
                     "token_prune": {"method": "lrcp", "prune_ratio": 0.75}}'

and is validated with pydantic when the model (worker) and its processor (API server) are built,
so a bad block stops the server at start-up with a message naming the key.

Request side, a chat request may carry ``prune_ratio`` / ``prune_method`` /
``video_prune_ratio`` at the top level of its JSON body. The endpoint plugin
(:mod:`vllm_tokenprune.serving`) validates them with :func:`parse_request_fields` and moves them
into the request's ``mm_processor_kwargs``, which vLLM hashes into every multimodal cache key
(processor cache, encoder cache, prefix cache), so an image pruned at two ratios never shares
embeddings. This module imports no vLLM code: it is shared by every process. Which methods
exist, and whether one acts inside the language model, is the method registry's answer
(:mod:`vllm_tokenprune.scoring`, including the methods of installed packages).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    field_validator,
    model_validator,
)

from vllm_tokenprune.scoring import LAYER, get_method, list_methods, validate_options


def known_methods() -> list[str]:
    """Every method a server can be configured with: the input-side scorers, then the
    layer-stage methods (``alvts``), as registered in this process."""
    return list_methods(None)


def _acts_in_layers(method: str) -> bool:
    return get_method(method).stage == LAYER

#: Request fields (top level of a chat/completions JSON body) and the same names inside
#: ``mm_processor_kwargs``.
REQUEST_FIELDS = ("prune_ratio", "prune_method", "video_prune_ratio")


class TokenPruneConfig(BaseModel):
    """Server configuration: the ``token_prune`` block of ``--hf-overrides``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # strict: a JSON string "0.5", true or 2.0 is refused (naming the key), never coerced.
    method: str = Field(
        "lrcp", strict=True,
        description="Default method: an input-side scorer (see `list_methods()`) or 'alvts'.")
    prune_ratio: float = Field(
        0.0, strict=True,
        description="Default fraction of visual tokens dropped per image, in [0, 1).",
    )
    video_prune_ratio: float | None = Field(
        None, strict=True, description="Default ratio for video items; None means `prune_ratio`."
    )
    min_keep: int = Field(
        1, ge=1, strict=True, description="Never keep fewer tokens than this per item."
    )
    max_greedy_keep: int = Field(
        2048, ge=1, strict=True,
        description="Most tokens a greedy method (resprune, divprune, cdpruner: one sequential "
        "step per kept token) may keep of one item; a request that needs more is refused (400).",
    )
    allowed_methods: tuple[Annotated[str, Strict()], ...] | None = Field(
        None, description="Methods requests may pick with `prune_method`; None means all."
    )
    options: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description='Per-method scorer options, e.g. {"lrcp": {"rank": 16}}.',
    )

    @field_validator("prune_ratio", "video_prune_ratio")
    @classmethod
    def _ratio_in_range(cls, v: float | None) -> float | None:
        if v is not None and not (0.0 <= v < 1.0):
            raise ValueError(f"must be in [0, 1), got {v!r}")
        return None if v is None else v + 0.0  # -0.0 -> 0.0

    @field_validator("method")
    @classmethod
    def _known_method(cls, v: str) -> str:
        if v not in known_methods():
            raise ValueError(f"unknown method {v!r}; known: {', '.join(known_methods())}")
        return v

    @field_validator("allowed_methods")
    @classmethod
    def _known_methods(cls, v: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if v is not None:
            unknown = [m for m in v if m not in known_methods()]
            if unknown:
                raise ValueError(
                    f"unknown method(s) {unknown}; known: {', '.join(known_methods())}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> TokenPruneConfig:
        # No location reaches the error of a model validator: the messages start with the key.
        if self.allowed_methods is not None and self.method not in self.allowed_methods:
            raise ValueError(f"allowed_methods: method {self.method!r} is not in allowed_methods")
        for name, opts in self.options.items():
            if name not in known_methods():
                raise ValueError(
                    f"options.{name}: unknown method {name!r}; known: {', '.join(known_methods())}"
                )
            try:
                validate_options(name, dict(opts))
            except (TypeError, ValueError) as e:
                raise ValueError(f"options.{name}: {e}") from None
        return self

    def is_allowed(self, method: str) -> bool:
        """Whether requests may pick ``method``. A layer-stage method needs server flags of its
        own (docs/alvts.md), so it is allowed only when named: as ``method`` or in
        ``allowed_methods``."""
        if _acts_in_layers(method):
            return method == self.method or method in (self.allowed_methods or ())
        return self.allowed_methods is None or method in self.allowed_methods

    def enabled_methods(self) -> list[str]:
        """Every registered method requests may pick on this server (the default included)."""
        return [m for m in known_methods() if self.is_allowed(m)]

    def layer_methods(self) -> list[str]:
        """The layer-stage methods this server enables (each needs its family's support)."""
        return [m for m in list_methods(LAYER) if self.is_allowed(m)]

    @property
    def alvts_enabled(self) -> bool:
        """Whether this server may route visual tokens layer by layer (``alvts``)."""
        return "alvts" in self.layer_methods()

    def ratio_for(self, modality: str) -> float:
        if modality == "video" and self.video_prune_ratio is not None:
            return self.video_prune_ratio
        return self.prune_ratio

    def options_for(self, method: str) -> dict[str, Any]:
        return dict(self.options.get(method, {}))


class TokenPruneConfigError(ValueError):
    """The ``token_prune`` block is invalid; the message names the key."""


def parse_config(raw: Mapping[str, Any] | TokenPruneConfig | None) -> TokenPruneConfig:
    """Validate a ``token_prune`` block (a dict from ``--hf-overrides``)."""
    if isinstance(raw, TokenPruneConfig):
        return raw
    if raw is None:
        return TokenPruneConfig()
    if not isinstance(raw, Mapping):
        raise TokenPruneConfigError(
            f"token_prune must be a JSON object, got {type(raw).__name__}"
        )
    try:
        return TokenPruneConfig.model_validate(dict(raw))
    except ValidationError as e:
        msgs = []
        for err in e.errors():
            loc = ".".join(str(p) for p in err["loc"])
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown key"
            msgs.append(f"token_prune.{loc}: {msg}" if loc else f"token_prune.{msg}")
        raise TokenPruneConfigError("invalid token_prune config: " + "; ".join(msgs)) from None


def config_from_hf_config(hf_config: Any) -> TokenPruneConfig:
    """The validated block stored on the HF config by ``--hf-overrides``."""
    raw = getattr(hf_config, "token_prune", None)
    return parse_config(raw)


class RequestFieldError(ValueError):
    """A request's pruning field is invalid; ``field`` names it (for the HTTP 400)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class OversizedInteger:
    """A JSON integer literal too long for Python's ``int`` (more than
    ``sys.get_int_max_str_digits()`` digits): the request bridge's parser hands it over in place
    of the number, so that the field it was sent as is refused by name."""

    def __init__(self, digits: int) -> None:
        self.digits = digits

    def __repr__(self) -> str:
        return f"an integer of {self.digits} digits"


#: Longest shown value in an error message (values come from clients and can be megabytes).
_SHOWN = 60


def shown(value: Any) -> str:
    """A short, safe description of a client value for an error message (never raises: huge
    integers, megabyte strings and deep nests all come out bounded)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        if value.bit_length() > 64:  # repr is slow, and refused past 4300 digits
            digits = int(value.bit_length() * 0.30103) + 1
            return f"{'-' if value < 0 else ''}an integer of about {digits} digits"
        return repr(value)
    if isinstance(value, (float, str, OversizedInteger)):
        text = repr(value)
    elif isinstance(value, (list, dict)):
        text = f"a JSON {'array' if isinstance(value, list) else 'object'}"
        return f"{text} of {len(value)} element{'s' if len(value) != 1 else ''}"
    else:
        text = type(value).__name__
    return text if len(text) <= _SHOWN else text[:_SHOWN - 4] + "...'"


def _check_ratio(field: str, value: Any) -> float:
    """A JSON number in [0, 1), exactly: a JSON integer of any length is compared as an
    integer (never converted to a float, which overflows past about 309 digits)."""
    # bool is an int subclass in Python: reject it explicitly, as JSON true is not a number.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestFieldError(field, f"must be a number in [0, 1), got {shown(value)}")
    if isinstance(value, int):
        if value != 0:
            raise RequestFieldError(field, f"must be a number in [0, 1), got {shown(value)}")
        return 0.0
    if not math.isfinite(value) or not (0.0 <= value < 1.0):
        raise RequestFieldError(field, f"must be a number in [0, 1), got {shown(value)}")
    return value + 0.0  # -0.0 -> 0.0 (one cache key per meaning)


def parse_request_fields(
    fields: Mapping[str, Any], config: TokenPruneConfig
) -> dict[str, float | str]:
    """Validate per-request pruning fields; return the subset to put in ``mm_processor_kwargs``.

    Raises :class:`RequestFieldError` naming the first bad field.
    """
    out: dict[str, float | str] = {}
    for field in ("prune_ratio", "video_prune_ratio"):
        if field in fields:
            out[field] = _check_ratio(field, fields[field])
    if "prune_method" in fields:
        method = fields["prune_method"]
        if not isinstance(method, str):
            raise RequestFieldError("prune_method", f"must be a string, got {shown(method)}")
        if method not in known_methods():
            raise RequestFieldError(
                "prune_method",
                f"unknown method {shown(method)}; known: {', '.join(known_methods())}",
            )
        if _acts_in_layers(method) and not config.is_allowed(method):
            raise RequestFieldError(
                "prune_method",
                f"method {method!r} is not enabled on this server: it is served only where the "
                f"server's token_prune.method is {method!r} or its allowed_methods lists it "
                "(it needs server flags of its own, docs/alvts.md)",
            )
        if not config.is_allowed(method):
            raise RequestFieldError(
                "prune_method",
                f"method {method!r} is not allowed by this server; allowed: "
                f"{', '.join(config.allowed_methods or ())}",
            )
        out["prune_method"] = method
    return out
