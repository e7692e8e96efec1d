"""An emulated CUDA device on a CPU-only machine: run GPU code paths, see what CUDA would refuse
and count device-to-host synchronisations (tests and benchmarks; pure torch, no vLLM import).

Inside :class:`GpuEmulation` (a context manager):

* a tensor on ``"cuda"`` is an :class:`EmulatedTensor`: a wrapper subclass holding a real CPU
  tensor (``.host``) whose values are computed for real, while ``.device`` is ``cuda:0`` and
  ``.is_cuda`` is True. Factory calls with ``device="cuda"`` (``torch.zeros``, ``arange``,
  ``tensor``, ``*_like``, ``new_*``, inside ``with torch.device("cuda")`` too), ``.to("cuda")``
  and ``.cuda()`` make one; ``.to("cpu")`` / ``.cpu()`` / ``copy_`` give a plain CPU tensor back.
  Everything else stays a plain CPU tensor: the host;
* every operation mixing emulated and host tensors is checked against CUDA's rules and refused
  with :class:`DeviceMixError` where CUDA refuses it: an operation with a host tensor of one or
  more dimensions next to a device tensor (``index_select``, ``index_copy_``, ``cat``, binary
  ops, ``matmul``, ``gather``, masks of ``masked_fill``...), a device tensor next to host ones in
  a host operation, and indexing a host tensor with device indices or a device mask. Accepted,
  as on CUDA: copies between devices, a 0-dim host tensor as a scalar operand of an element-wise
  operation (and as the value of ``masked_fill``/``fill_``/``index_put_``), and indexing (read or
  write) a device tensor with host index tensors or a host mask;
* every device-to-host synchronisation is recorded (:class:`Sync`) with where it happened:
  ``.item()``, ``.tolist()``, ``bool()``/``int()``/``float()`` of a device tensor, ``.cpu()`` /
  ``.to("cpu")`` / ``copy_`` into a host tensor, data-dependent shapes (``nonzero``,
  ``masked_select``, boolean-mask indexing or assignment with a device mask, ``unique``,
  ``repeat_interleave`` without ``output_size``), ``torch.equal``, solvers that check their
  info flag on the host (``eigh``, ``svd``), printing, and ``synchronize()`` of the emulated
  stream, event or device;
* ``torch.cuda.current_stream``, ``Stream``, ``stream``, ``Event``, ``synchronize`` and
  ``current_device`` are replaced by emulated ones (events record host time; ``query()`` is
  True; ``elapsed_time`` works), as code timing the device uses them.

Not emulated: asynchrony itself (kernels run when launched), pinned memory (``pin_memory``
requests give plain host tensors), multiple devices, CUDA graphs (a capture attempt fails, so
the greedy scorers' graph replay takes its eager fallback here), memory limits.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

__all__ = [
    "DeviceMixError",
    "EmulatedTensor",
    "GpuEmulation",
    "Sync",
    "active",
    "emulate_module",
    "host",
]

aten = torch.ops.aten
CUDA = torch.device("cuda", 0)

_PLUGIN_DIR = os.sep + "vllm_tokenprune" + os.sep
_TESTING_DIR = os.sep + "vllm_tokenprune" + os.sep + "testing" + os.sep
_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_THIS_FILE = os.path.abspath(__file__)


class DeviceMixError(RuntimeError):
    """An operation CUDA refuses: device and host tensors mixed where CUDA does not accept it."""


class Sync(NamedTuple):
    """One device-to-host synchronisation: what, where (``file:line`` of the innermost frame
    outside torch), whose code (``plugin``: vllm_tokenprune, ``vllm``, or ``other``) and the
    phase the caller had set (:meth:`GpuEmulation.phase`)."""

    kind: str
    where: str
    owner: str
    phase: str


_state = threading.local()


def active() -> GpuEmulation | None:
    """The innermost active emulation of this thread, or None."""
    stack = getattr(_state, "stack", None)
    return stack[-1] if stack else None


# --------------------------------------------------------------------------- the tensor


class EmulatedTensor(torch.Tensor):
    """A tensor on the emulated ``cuda:0``: wraps a real CPU tensor (:attr:`host`)."""

    host: torch.Tensor

    @staticmethod
    def __new__(cls, host_tensor: torch.Tensor) -> EmulatedTensor:
        if isinstance(host_tensor, EmulatedTensor):
            return host_tensor
        # an inference tensor exactly when the host one is (views of normal tensors made in
        # inference mode are normal tensors)
        with torch.inference_mode(host_tensor.is_inference()):
            r = torch.Tensor._make_wrapper_subclass(  # type: ignore[attr-defined]
                cls, host_tensor.size(), strides=host_tensor.stride(),
                storage_offset=host_tensor.storage_offset(), dtype=host_tensor.dtype,
                layout=host_tensor.layout, device=CUDA,
                requires_grad=host_tensor.requires_grad)
        r.host = host_tensor
        return r

    # Function-level handling is the mode's (:class:`_FunctionMode`); a tensor used without an
    # active emulation (e.g. a module kept between tests) still computes.
    __torch_function__ = torch._C._disabled_torch_function_impl  # type: ignore[assignment]

    def __repr__(self, *, tensor_contents: Any = None) -> str:  # noqa: D105
        return f"EmulatedTensor(device='cuda:0', {self.host!r})"

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        emu = active()
        _check_dispatch(func, args, kwargs)
        kind = _sync_kind(func, args, kwargs)
        if kind is not None and emu is not None:
            emu._record(kind)
        to_host = func in (aten._to_copy.default,) and _is_host_device(kwargs.get("device"))
        h_args, h_kwargs = tree_map(_unwrap, (args, kwargs))
        if "device" in h_kwargs and _is_cuda(h_kwargs["device"]):
            h_kwargs["device"] = torch.device("cpu")
        if emu is not None and func is aten.copy_.default:
            if isinstance(args[0], EmulatedTensor) and not isinstance(args[1], EmulatedTensor):
                emu.h2d += 1
        out = func(*h_args, **h_kwargs)
        if func is aten.copy_.default:
            return args[0]
        if to_host:
            return out
        originals = {id(_unwrap(a)): a for a in tree_flatten((args, kwargs))[0]
                     if isinstance(a, EmulatedTensor)}

        def wrap(x: Any) -> Any:
            if not isinstance(x, torch.Tensor):
                return x
            if id(x) in originals:  # in-place / out= results: the caller's own wrapper
                return originals[id(x)]
            return EmulatedTensor(x)

        return tree_map(wrap, out)


def _unwrap(x: Any) -> Any:
    return x.host if isinstance(x, EmulatedTensor) else x


def host(x: Any) -> Any:
    """The CPU tensor behind an emulated one (anything else unchanged), without counting a
    sync: for test assertions only."""
    return tree_map(_unwrap, x)


def _is_cuda(device: Any) -> bool:
    if device is None:
        return False
    if isinstance(device, int):
        return False
    return torch.device(device).type == "cuda"


def _is_host_device(device: Any) -> bool:
    return device is not None and not isinstance(device, int) and \
        torch.device(device).type == "cpu"


# --------------------------------------------------------------------------- CUDA's rules

#: Operations whose inputs may live on different devices (copies).
_COPY_OPS = {aten.copy_.default, aten._to_copy.default, aten._copy_from.default,
             aten._copy_from_and_resize.default, aten.lift_fresh.default,
             aten.lift_fresh_copy.default}
#: Indexing: a device tensor accepts host index tensors (CUDA moves them over).
_INDEX_OPS = {aten.index.Tensor, aten._unsafe_index.Tensor, aten.index_put_.default,
              aten.index_put.default, aten._index_put_impl_.default,
              aten._unsafe_index_put.default}
#: Non-element-wise operations that accept a 0-dim host tensor as a scalar value.
_SCALAR_VALUE_OPS = {aten.masked_fill_.Tensor, aten.masked_fill.Tensor, aten.fill_.Tensor,
                     aten.fill.Tensor}


def _tensors(x: Any) -> list[torch.Tensor]:
    return [t for t in tree_flatten(x)[0] if isinstance(t, torch.Tensor)]


def _refuse(func: Any, why: str) -> None:
    raise DeviceMixError(f"{func}: {why} (CUDA refuses this: expected all tensors to be on the "
                         "same device)")


def _check_dispatch(func: Any, args: tuple, kwargs: dict) -> None:
    if func in _COPY_OPS:
        return
    if func in _INDEX_OPS:
        _check_index(func, args[0], args[1], args[2] if len(args) > 2 else None)
        return
    tensors = _tensors((args, kwargs))
    dev = [t for t in tensors if isinstance(t, EmulatedTensor)]
    hosted = [t for t in tensors if not isinstance(t, EmulatedTensor)]
    if not dev or not hosted:
        return
    if any(t.dim() > 0 for t in hosted):
        shapes = [tuple(t.shape) for t in hosted if t.dim() > 0]
        _refuse(func, f"host tensor(s) of shape {shapes} used with cuda tensor(s)")
    pointwise = torch.Tag.pointwise in getattr(func, "tags", ())
    if not (pointwise or func in _SCALAR_VALUE_OPS):
        _refuse(func, "a 0-dim host tensor used with cuda tensor(s) outside an element-wise op")
    if isinstance(args[0], torch.Tensor) and not isinstance(args[0], EmulatedTensor) \
            and args[0].dim() > 0:
        _refuse(func, "a cuda tensor used in an operation on a host tensor")


def _check_index(func: Any, self: torch.Tensor, indices: Any, values: Any) -> None:
    idx = _tensors(indices)
    if isinstance(self, EmulatedTensor):
        if isinstance(values, torch.Tensor) and not isinstance(values, EmulatedTensor) \
                and values.dim() > 0:
            _refuse(func, "host values of shape "
                    f"{tuple(values.shape)} written into a cuda tensor by index")
        return
    if any(isinstance(t, EmulatedTensor) for t in idx):
        _refuse(func, "a host tensor indexed with cuda indices (indices should be either on "
                "cpu or on the same device as the indexed tensor)")
    if isinstance(values, EmulatedTensor):
        _refuse(func, "cuda values written into a host tensor by index")


#: Operations that make the host wait for the device when their input is on it.
_SYNC_OPS = {
    aten._local_scalar_dense.default: "item",
    aten.is_nonzero.default: "bool",
    aten.equal.default: "equal",
    aten.nonzero.default: "nonzero",
    aten.nonzero_numpy.default: "nonzero",
    aten.argwhere.default: "nonzero",
    aten.masked_select.default: "masked_select",
    aten._unique.default: "unique",
    aten._unique2.default: "unique",
    aten.unique_dim.default: "unique",
    aten.unique_consecutive.default: "unique",
    aten.unique_dim_consecutive.default: "unique",
    # solvers that check their info flag on the host (the ``_ex`` variants do not); under
    # inference mode the composite ``linalg_*`` op is what is dispatched
    aten._linalg_eigh.default: "solver info check (eigh)",
    aten.linalg_eigh.default: "solver info check (eigh)",
    aten.linalg_eigvalsh.default: "solver info check (eigh)",
    aten._linalg_svd.default: "solver info check (svd)",
    aten.linalg_svd.default: "solver info check (svd)",
    aten.linalg_svdvals.default: "solver info check (svd)",
    aten.linalg_cholesky.default: "solver info check (cholesky)",
    aten.linalg_inv.default: "solver info check (inv)",
    aten.linalg_solve.default: "solver info check (solve)",
    aten._linalg_check_errors.default: "solver info check",
    aten.linalg_eig.default: "solver info check (eig)",
    aten.bincount.default: "bincount",
    aten.allclose.default: "allclose",
}


def _sync_kind(func: Any, args: tuple, kwargs: dict) -> str | None:
    if func in _SYNC_OPS:
        return _SYNC_OPS[func] if isinstance(args[0], EmulatedTensor) else None
    if func is aten.repeat_interleave.Tensor:
        if isinstance(args[0], EmulatedTensor) and kwargs.get("output_size") is None:
            return "repeat_interleave without output_size"
        return None
    if func in _INDEX_OPS:
        if isinstance(args[0], EmulatedTensor) and any(
                isinstance(t, EmulatedTensor) and t.dtype in (torch.bool, torch.uint8)
                for t in _tensors(args[1])):
            return "boolean mask index"
        return None
    if func is aten.copy_.default:
        if not isinstance(args[0], EmulatedTensor) and isinstance(args[1], EmulatedTensor):
            return "copy to host"
        return None
    if func is aten._to_copy.default:
        if isinstance(args[0], EmulatedTensor) and _is_host_device(kwargs.get("device")):
            return "copy to host"
    return None


# --------------------------------------------------------------------------- function level

_T = torch.Tensor
#: Reading a device tensor's values on the host.
_HOST_READS = {_T.tolist: "tolist", _T.item: "item", _T.__bool__: "bool", _T.__int__: "int",
               _T.__float__: "float", _T.__index__: "int", _T.__complex__: "complex",
               _T.__repr__: "print", _T.__str__: "print", _T.__format__: "print"}
_NO_NUMPY = {_T.numpy, _T.__array__}


def _to_args(args: tuple, kwargs: dict) -> tuple[Any, dict]:
    """(device, kwargs for a CPU ``.to``) of a ``Tensor.to`` call."""
    rest = args[1:]
    if rest and isinstance(rest[0], torch.Tensor):  # to(other, non_blocking, copy)
        other = rest[0]
        out = {"dtype": other.dtype}
        names = ("non_blocking", "copy")
        out.update(zip(names, rest[1:], strict=False))
        out.update({k: v for k, v in kwargs.items() if k in names})
        return other.device, out
    device, dtype, non_blocking, memory_format = torch._C._nn._parse_to(*rest, **kwargs)
    out = {"non_blocking": non_blocking}
    if dtype is not None:
        out["dtype"] = dtype
    if memory_format is not None:
        out["memory_format"] = memory_format
    if kwargs.get("copy"):
        out["copy"] = True
    elif len(rest) >= 4 and isinstance(rest[3], bool) and isinstance(rest[0], (str, torch.device)):
        out["copy"] = rest[3]
    return device, out


def _wrap_new(out: Any) -> Any:
    """Fresh tensors made for the device: wrap them."""
    return tree_map(lambda x: EmulatedTensor(x) if isinstance(x, torch.Tensor) and
                    not isinstance(x, EmulatedTensor) else x, out)


def _host_run(func: Any, args: tuple, kwargs: dict) -> Any:
    """Run a composite whose C++ body branches on the device (e.g. SDPA picks CUDA kernels)
    on the host tensors, after the usual device check; device outputs when inputs were."""
    tensors = _tensors((args, kwargs))
    if not any(isinstance(t, EmulatedTensor) for t in tensors):
        return func(*args, **kwargs)
    bad = [tuple(t.shape) for t in tensors if not isinstance(t, EmulatedTensor) and t.dim() > 0]
    if bad:
        _refuse(func, f"host tensor(s) of shape {bad} used with cuda tensor(s)")
    return _wrap_new(func(*host(args), **host(kwargs)))


def _nonzero(self: torch.Tensor, *, as_tuple: bool = False, out: Any = None) -> Any:
    idx = aten.nonzero.default(self)
    return idx.unbind(1) if as_tuple else idx


def _contiguous(self: torch.Tensor,
                memory_format: torch.memory_format = torch.contiguous_format) -> Any:
    if self.is_contiguous(memory_format=memory_format):
        return self
    return aten.clone.default(self, memory_format=memory_format)


def _new_tensor(self: torch.Tensor, data: Any, dtype: Any = None, device: Any = None,
                requires_grad: bool = False) -> torch.Tensor:
    out = torch.tensor(data, dtype=dtype or self.dtype, requires_grad=requires_grad)
    return EmulatedTensor(out) if _is_cuda(device or self.device) else out


#: Tensor methods whose Python binding takes a CUDA device guard (which a CPU-only build
#: cannot make): the same computation through the dispatcher.
_REDIRECTS: dict[Any, Callable[..., Any]] = {
    _T.nonzero: _nonzero,
    torch.nonzero: _nonzero,
    _T.copy_: lambda self, src, non_blocking=False: aten.copy_.default(self, src, non_blocking),
    _T.contiguous: _contiguous,
    _T.__invert__: lambda self: aten.bitwise_not.default(self),
    _T.bitwise_not: lambda self: aten.bitwise_not.default(self),
    _T.logical_not: lambda self: aten.logical_not.default(self),
    _T.new_tensor: _new_tensor,
}
#: Composites whose C++ body picks kernels by device: run on the host tensors.
_HOST_RUN = {torch.nn.functional.scaled_dot_product_attention}


class _FunctionMode(TorchFunctionMode):
    def __init__(self, emu: GpuEmulation) -> None:
        super().__init__()
        self.emu = emu

    def __torch_function__(self, func: Any, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        emu = self.emu
        self_ = args[0] if args else None
        if func in _HOST_READS and isinstance(self_, EmulatedTensor):
            emu._record(_HOST_READS[func])
            return func(self_.host, *args[1:], **kwargs)
        if func in _NO_NUMPY and isinstance(self_, EmulatedTensor):
            raise TypeError("can't convert cuda:0 device type tensor to numpy. Use "
                            "Tensor.cpu() to copy the tensor to host memory first.")
        if func is _T.__getitem__:
            return self._getitem(func, self_, args[1])
        if func is _T.__setitem__:
            return self._setitem(func, self_, args[1], args[2])
        if func in (_T.to, _T.cuda, _T.cpu):
            return self._to(func, self_, args, kwargs)
        if func in (torch.as_tensor, torch.asarray, torch.tensor) and \
                isinstance(self_, EmulatedTensor):  # the C++ path asks the device for itself
            device = kwargs.get("device") or CUDA
            out = self._to(_T.to, self_, (self_, device),
                           {"dtype": kwargs.get("dtype") or self_.dtype})
            return out.clone() if func is torch.tensor else out
        if func is _T.pin_memory and not isinstance(self_, EmulatedTensor):
            return self_.clone()  # a copy, as pinning makes one (not pinned: no CUDA here)
        redirect = _REDIRECTS.get(func)
        if redirect is not None and any(isinstance(t, EmulatedTensor)
                                        for t in _tensors((args, kwargs))):
            return redirect(*args, **kwargs)
        if func in _HOST_RUN:
            return _host_run(func, args, kwargs)
        kwargs.pop("pin_memory", None)  # no pinned memory here: a plain host tensor
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            kwargs["device"] = "cpu"
            if func in (torch.tensor, torch.as_tensor):
                emu.h2d += 1
            return _wrap_new(func(*args, **kwargs))
        try:
            return func(*args, **kwargs)
        except RuntimeError as e:
            if "not linked with support for cuda devices" not in str(e):
                raise
            raise RuntimeError(f"gpu_emulation: {func} needs a CUDA device guard in its Python "
                               "binding; handle it in gpu_emulation._REDIRECTS") from e

    def _getitem(self, func: Any, self_: Any, index: Any) -> Any:
        idx = _tensors(index)
        if isinstance(self_, EmulatedTensor):
            if any(isinstance(t, EmulatedTensor) and t.dtype in (torch.bool, torch.uint8)
                   for t in idx):
                self.emu._record("boolean mask index")
            return EmulatedTensor(self_.host[host(index)])
        if any(isinstance(t, EmulatedTensor) for t in idx):
            _refuse("Tensor.__getitem__", "a host tensor indexed with cuda indices or a cuda "
                    "mask")
        return func(self_, index)

    def _setitem(self, func: Any, self_: Any, index: Any, value: Any) -> None:
        idx = _tensors(index)
        if isinstance(self_, EmulatedTensor):
            if isinstance(value, torch.Tensor) and not isinstance(value, EmulatedTensor) \
                    and value.dim() > 0:
                _refuse("Tensor.__setitem__", f"host values of shape {tuple(value.shape)} "
                        "written into a cuda tensor")
            if any(isinstance(t, EmulatedTensor) and t.dtype in (torch.bool, torch.uint8)
                   for t in idx):
                self.emu._record("boolean mask index")
            self_.host[host(index)] = _unwrap(value)
            return None
        if any(isinstance(t, EmulatedTensor) for t in idx) or \
                isinstance(value, EmulatedTensor):
            _refuse("Tensor.__setitem__", "a host tensor written with cuda indices or values")
        return func(self_, index, value)

    def _to(self, func: Any, self_: Any, args: tuple, kwargs: dict) -> Any:
        if func is _T.cpu:
            device, opts = torch.device("cpu"), {}
        elif func is _T.cuda:
            device = CUDA
            opts = {"non_blocking": bool(kwargs.get("non_blocking", False))}
        else:
            device, opts = _to_args(args, kwargs)
        dev = isinstance(self_, EmulatedTensor)
        src = self_.host if dev else self_
        if device is None:  # dtype / memory format only: stays where it is
            out = src.to(**opts)
            return self_ if out is src else (EmulatedTensor(out) if dev else out)
        if _is_cuda(device):
            if dev:
                out = src.to(**opts)
                return self_ if out is src else EmulatedTensor(out)
            self.emu.h2d += 1
            opts["copy"] = True
            return EmulatedTensor(src.to(**opts))
        if dev:
            self.emu._record("copy to host")
            opts["copy"] = True
            return src.to(**opts)
        return src.to(device, **opts)


class _DispatchMode(TorchDispatchMode):
    """Factory calls that C++ composites make for a cuda tensor (``empty`` with the input's
    options): made on the host and wrapped."""

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if "device" in kwargs and _is_cuda(kwargs["device"]) and not any(
                isinstance(t, EmulatedTensor) for t in _tensors(args)):
            kwargs = {**kwargs, "device": torch.device("cpu")}
            kwargs.pop("pin_memory", None)
            return _wrap_new(func(*args, **kwargs))
        return func(*args, **kwargs)


# --------------------------------------------------------------------------- torch.cuda


class _Stream:
    """An emulated CUDA stream (work is synchronous here)."""

    device = CUDA
    cuda_stream = 0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def synchronize(self) -> None:
        _record_active("stream synchronize")

    def query(self) -> bool:
        return True

    def wait_stream(self, other: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def record_event(self, event: Any = None) -> _Event:
        event = event or _Event()
        event.record(self)
        return event


class _Event:
    """An emulated CUDA event: ``record`` notes host time, ``query`` is True."""

    def __init__(self, enable_timing: bool = False, blocking: bool = False,
                 interprocess: bool = False) -> None:
        self.enable_timing = enable_timing
        self.time: float | None = None

    def record(self, stream: Any = None) -> None:
        self.time = time.perf_counter()

    def query(self) -> bool:
        return True

    def wait(self, stream: Any = None) -> None:
        pass

    def synchronize(self) -> None:
        _record_active("event synchronize")

    def elapsed_time(self, end: _Event) -> float:
        if not (self.enable_timing and self.time is not None and end.time is not None):
            raise RuntimeError("Both events must be recorded with enable_timing=True")
        return (end.time - self.time) * 1e3


_STREAM = _Stream()


def _record_active(kind: str) -> None:
    emu = active()
    if emu is not None:
        emu._record(kind)


_CUDA_PATCHES: dict[str, Callable[..., Any] | type] = {
    "current_stream": lambda device=None: _STREAM,
    "default_stream": lambda device=None: _STREAM,
    "Stream": _Stream,
    "Event": _Event,
    "stream": lambda s=None: contextlib.nullcontext(s),
    "synchronize": lambda device=None: _record_active("device synchronize"),
    "current_device": lambda: 0,
    # CUDA graphs are not emulated: a capture attempt (the greedy scorers' ``run_graphed``)
    # fails, which is the path a GPU takes when capture fails (eager from then on).
    "is_current_stream_capturing": lambda: False,
    "memory_reserved": lambda device=None: 0,
    "CUDAGraph": lambda *a, **k: _no_graphs(),
}


def _no_graphs() -> Any:
    raise RuntimeError("CUDA graphs are not emulated")


# --------------------------------------------------------------------------- the context


@dataclass
class GpuEmulation:
    """Emulate ``cuda:0`` on the host for the duration of a ``with`` block; see the module
    docstring. ``syncs`` collects every device-to-host synchronisation, ``h2d`` counts
    host-to-device copies (not synchronisations: the host does not wait for the device)."""

    syncs: list[Sync] = field(default_factory=list)
    h2d: int = 0
    _phase: str = ""
    _saved: dict[str, Any] = field(default_factory=dict)
    _mode: _FunctionMode | None = None
    _dmode: _DispatchMode | None = None

    def __enter__(self) -> GpuEmulation:
        stack = getattr(_state, "stack", None)
        if stack is None:
            stack = _state.stack = []
        if not stack:
            for name, value in _CUDA_PATCHES.items():
                self._saved[name] = getattr(torch.cuda, name)
                setattr(torch.cuda, name, value)
        stack.append(self)
        self._mode = _FunctionMode(self)
        self._mode.__enter__()
        self._dmode = _DispatchMode()
        self._dmode.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        assert self._mode is not None and self._dmode is not None
        self._dmode.__exit__(*exc)
        self._dmode = None
        self._mode.__exit__(*exc)
        self._mode = None
        _state.stack.pop()
        for name, value in self._saved.items():
            setattr(torch.cuda, name, value)
        self._saved.clear()

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Label the syncs recorded inside the block (e.g. ``embed_multimodal``)."""
        previous, self._phase = self._phase, name
        try:
            yield
        finally:
            self._phase = previous

    def _record(self, kind: str) -> None:
        where, owner = _caller()
        self.syncs.append(Sync(kind, where, owner, self._phase))

    def count(self, owner: str | None = None, phase: str | None = None) -> int:
        """Syncs recorded so far (optionally only ``owner``'s / in ``phase``)."""
        return sum(1 for s in self.syncs
                   if (owner is None or s.owner == owner) and (phase is None or s.phase == phase))

    def by_site(self, owner: str | None = None) -> Counter[tuple[str, str]]:
        """(kind, where) -> count, for reports and failure messages."""
        return Counter((s.kind, s.where) for s in self.syncs
                       if owner is None or s.owner == owner)

    def reset(self) -> None:
        self.syncs.clear()
        self.h2d = 0


def _caller() -> tuple[str, str]:
    """``file:line`` and owner of the innermost frame outside torch and this module."""
    frame = sys._getframe(2)
    while frame is not None:
        path = frame.f_code.co_filename
        if not (path.startswith(_TORCH_DIR) or os.path.abspath(path) == _THIS_FILE
                or path.startswith("<")):
            break
        frame = frame.f_back
    if frame is None:
        return "?", "other"
    path = frame.f_code.co_filename
    if _PLUGIN_DIR in path and _TESTING_DIR not in path:
        owner = "plugin"
        short = "vllm_tokenprune" + os.sep + path.split(_PLUGIN_DIR, 1)[1]
    elif os.sep + "vllm" + os.sep in path:
        owner = "vllm"
        short = "vllm" + os.sep + path.rsplit(os.sep + "vllm" + os.sep, 1)[1]
    else:
        owner = "other"
        short = os.path.basename(path)
    return f"{short}:{frame.f_lineno}", owner


def emulate_module(module: torch.nn.Module) -> torch.nn.Module:
    """Move a module built on the host onto the emulated device, in place: its parameters and
    buffers (as ``module.to("cuda")``), and the plain tensor attributes of its submodules
    (tensors a module builds in ``__init__`` without naming a device, which a model built
    under ``with torch.device("cuda")`` has on the device)."""
    def move(t: torch.Tensor) -> torch.Tensor:
        return t if isinstance(t, EmulatedTensor) else EmulatedTensor(t)

    for sub in module.modules():
        for name, param in sub._parameters.items():
            if param is not None and not isinstance(param, EmulatedTensor):
                sub._parameters[name] = torch.nn.Parameter(  # inference only: no grad
                    EmulatedTensor(param.detach()), requires_grad=False)
        for name, buf in sub._buffers.items():
            if buf is not None:
                sub._buffers[name] = move(buf)
        for name, value in list(vars(sub).items()):
            if name.startswith("_"):
                continue
            if isinstance(value, torch.Tensor):
                setattr(sub, name, move(value))
            elif isinstance(value, list) and value and all(
                    isinstance(v, torch.Tensor) for v in value):
                setattr(sub, name, [move(v) for v in value])  # e.g. Qwen3-VL's deepstack
    return module
