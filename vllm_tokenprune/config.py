"""The ``token_prune`` block of a served model, and the per-request pruning fields.

Server side, the block arrives through vLLM's own ``--hf-overrides``::

    --hf-overrides '{"architectures": ["TokenPruneQwen2_5_VLForConditionalGeneration"],
                     "token_prune": {"method": "lrcp", "prune_ratio": 0.75}}'

and is validated with pydantic when the model (worker) and its processor (API server) are built,
so a bad block stops the server at start-up with a message naming the key.

Request side, a chat request may carry ``prune_ratio`` / ``prune_method`` /
``video_prune_ratio`` / ``max_visual_tokens`` at the top level of its JSON body, and a
``detail`` per image (``image_url.detail``, OpenAI's field), which the bridge hands on as
``image_detail`` (one entry per image item, in the order vLLM's chat parser numbers them).
The endpoint plugin
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
from typing import Annotated, Any, Literal

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
REQUEST_FIELDS = ("prune_ratio", "prune_method", "video_prune_ratio", "max_visual_tokens")
#: The per-image ``detail`` values, as the bridge writes them into ``mm_processor_kwargs``
#: (never a top-level body field: read from the chat messages' ``image_url.detail``).
DETAIL_KEY = "image_detail"
#: Every key the bridge writes (and seals) into ``mm_processor_kwargs``.
SEALED_FIELDS = (*REQUEST_FIELDS, DETAIL_KEY)
#: ``prune_ratio`` / ``video_prune_ratio`` value that picks each item's count from its content.
AUTO = "auto"
#: ``detail`` values that change an item's count (``"auto"`` or absent: nothing changes).
DETAILS = ("low", "high")
#: Default of ``token_prune.low_detail_tokens`` (docs/budgets.md: a 224x224 thumbnail's worth
#: on Qwen-VL, the order of OpenAI's fixed 85-token low-detail image).
LOW_DETAIL_TOKENS = 64


class TokenPruneConfig(BaseModel):
    """Server configuration: the ``token_prune`` block of ``--hf-overrides``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # strict: a JSON string "0.5", true or 2.0 is refused (naming the key), never coerced.
    method: str = Field(
        "lrcp", strict=True,
        description="Default method: an input-side scorer (see `list_methods()`) or 'alvts'.")
    prune_ratio: Annotated[float, Strict()] | Literal["auto"] = Field(
        0.0,
        description="Default fraction of visual tokens dropped per image, in [0, 1), or 'auto' "
        "(each item's count from its content, docs/budgets.md).",
    )
    video_prune_ratio: Annotated[float, Strict()] | Literal["auto"] | None = Field(
        None, description="Default ratio for video items; None means `prune_ratio`."
    )
    max_visual_tokens: int | None = Field(
        None, ge=1, strict=True,
        description="Default cap on a request's kept visual tokens over all its items (None: no "
        "cap); split over the items by docs/budgets.md's rule.")
    low_detail_tokens: int = Field(
        LOW_DETAIL_TOKENS, ge=1, strict=True,
        description="Most tokens an image sent with detail 'low' keeps.")
    auto: dict[str, Any] = Field(
        default_factory=dict,
        description="Options of prune_ratio 'auto' (vllm_tokenprune.budget.AutoOptions; checked "
        "when the processor is built, in the API server).")
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
    def _ratio_in_range(cls, v: float | str | None) -> float | str | None:
        if v is None or v == AUTO:
            return v
        assert isinstance(v, float)
        if not (0.0 <= v < 1.0):
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
        if _acts_in_layers(self.method):
            for key in ("prune_ratio", "video_prune_ratio"):
                if getattr(self, key) == AUTO:
                    raise ValueError(f"{key}: 'auto' needs an input-side method, not "
                                     f"{self.method!r}")
            if self.max_visual_tokens is not None:
                raise ValueError(f"max_visual_tokens: needs an input-side method, not "
                                 f"{self.method!r}")
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

    def ratio_for(self, modality: str) -> float | str:
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


def _check_ratio_or_auto(field: str, value: Any) -> float | str:
    if isinstance(value, str) and value == AUTO:
        return AUTO
    if isinstance(value, str):
        raise RequestFieldError(field, f"must be a number in [0, 1) or \"auto\", got "
                                f"{shown(value)}")
    return _check_ratio(field, value)


#: Largest ``max_visual_tokens`` (2^31 - 1: far above any request, and a C int everywhere).
MAX_CAP = 2**31 - 1


def _check_cap(value: Any) -> int:
    """``max_visual_tokens``: a JSON integer >= 1 (not a float, not ``true``)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_CAP:
        raise RequestFieldError("max_visual_tokens",
                                f"must be an integer in [1, {MAX_CAP}], got {shown(value)}")
    return int(value)


def check_detail(value: Any, where: str = "detail") -> str | None:
    """One image's ``detail``: ``"low"`` / ``"high"``; ``"auto"`` or absent (None) change
    nothing and come back as None."""
    if value is None or (isinstance(value, str) and value == "auto"):
        return None
    if isinstance(value, str) and value in DETAILS:
        return str(value)
    raise RequestFieldError(where, f'must be "low", "high" or "auto", got {shown(value)}')


def _check_details(value: Any) -> list[str | None]:
    if not isinstance(value, list) or not value:
        raise RequestFieldError(DETAIL_KEY, f"must be a non-empty list, got {shown(value)}")
    return [check_detail(v, DETAIL_KEY) for v in value]


def parse_request_fields(
    fields: Mapping[str, Any], config: TokenPruneConfig
) -> dict[str, Any]:
    """Validate per-request pruning fields; return the subset to put in ``mm_processor_kwargs``.

    Raises :class:`RequestFieldError` naming the first bad field.
    """
    out: dict[str, Any] = {}
    for field in ("prune_ratio", "video_prune_ratio"):
        if field in fields:
            out[field] = _check_ratio_or_auto(field, fields[field])
    if "max_visual_tokens" in fields:
        out["max_visual_tokens"] = _check_cap(fields["max_visual_tokens"])
    if DETAIL_KEY in fields:
        out[DETAIL_KEY] = _check_details(fields[DETAIL_KEY])
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
    if _acts_in_layers(str(out.get("prune_method", config.method))):
        for field in ("prune_ratio", "video_prune_ratio", "max_visual_tokens"):
            if field in out and (field == "max_visual_tokens" or out[field] == AUTO):
                raise RequestFieldError(
                    field, f"{shown(fields[field])} needs an input-side method: a layer-stage "
                    "method keeps every visual token in the prompt")
        if DETAIL_KEY in out:
            raise RequestFieldError(
                "detail", "low/high detail needs an input-side method: a layer-stage method "
                "keeps every visual token in the prompt")
    return out
