"""The emulated CUDA device's rules (vllm_tokenprune/testing/gpu_emulation.py): what it refuses,
what it accepts and which operations it counts as device-to-host syncs, as one table.

The same table runs on a real GPU where one is present (``test_table_on_real_cuda``, marker
``gpu``): each refusal must be a RuntimeError there and each counted sync a synchronising
operation for ``torch.cuda.set_sync_debug_mode``, so the emulation's rules are checked against
CUDA itself, not only against this file's author.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import pytest
import torch

from vllm_tokenprune.metrics import worker as metrics
from vllm_tokenprune.testing.gpu_emulation import (
    DeviceMixError,
    EmulatedTensor,
    GpuEmulation,
    emulate_module,
    host,
)

pytestmark = pytest.mark.gpu_emulation

Dev = Callable[[torch.Tensor], torch.Tensor]


class Case(NamedTuple):
    name: str
    run: Callable[[Dev], Any]
    refused: bool = False
    syncs: int = 0


def _x(dev: Dev) -> torch.Tensor:
    return dev(torch.arange(12.0).reshape(4, 3))


def _idx(dev: Dev) -> torch.Tensor:
    return dev(torch.tensor([2, 0]))


def _mask(dev: Dev) -> torch.Tensor:
    return dev(torch.tensor([True, False, True, False]))


H = torch.tensor  # host tensors are made with plain torch calls

CASES = [
    # --- refused: a host tensor of one or more dimensions next to a device tensor
    Case("index_select with a host index", lambda d: _x(d).index_select(0, H([1])), True),
    Case("index_copy_ with a host index",
         lambda d: _x(d).index_copy_(0, H([1]), _x(d)[:1]), True),
    Case("cat of device and host", lambda d: torch.cat([_x(d), torch.zeros(1, 3)]), True),
    Case("binary op with a host vector", lambda d: _x(d) * H([1.0, 2.0, 3.0]), True),
    Case("host vector plus a device scalar", lambda d: H([1.0, 2.0]) + d(H(3.0)), True),
    Case("matmul with host weights", lambda d: _x(d) @ torch.ones(3, 2), True),
    Case("embedding lookup with host ids",
         lambda d: torch.nn.functional.embedding(H([0, 1]), _x(d)), True),
    Case("where with a host condition",
         lambda d: torch.where(H([True, False, True]), _x(d)[0], 0.0), True),
    Case("masked_fill with a host mask",
         lambda d: _x(d)[:, 0].masked_fill(H([True, False, True, False]), 0.0), True),
    Case("gather with a host index", lambda d: _x(d).gather(0, H([[0, 1, 2]])), True),
    Case("host tensor indexed with device indices", lambda d: torch.arange(4)[_idx(d)], True),
    Case("host tensor indexed with a device mask", lambda d: torch.arange(4)[_mask(d)], True),
    Case("host values written into a device tensor",
         lambda d: _x(d).__setitem__(slice(0, 1), torch.zeros(1, 3)), True),
    Case("device values written into a host tensor",
         lambda d: torch.zeros(4, 3).__setitem__(H([0]), _x(d)[:1]), True),
    # --- accepted, no sync
    Case("binary op with a 0-dim host tensor", lambda d: _x(d) * H(2.0)),
    Case("index_select with a device index", lambda d: _x(d).index_select(0, _idx(d))),
    Case("device tensor indexed with host indices", lambda d: _x(d)[H([2, 0])]),
    Case("device tensor indexed with a host mask",
         lambda d: _x(d)[H([True, False, True, False])]),
    Case("device tensor written at host indices", lambda d: _x(d).__setitem__(H([1]), 0.0)),
    Case("device tensor written at device indices",
         lambda d: _x(d).__setitem__(_idx(d), _x(d)[:2])),
    Case("masked_fill with a 0-dim host value",
         lambda d: _x(d)[:, 0].masked_fill(_mask(d), H(1.0))),
    Case("host-to-device copies", lambda d: (d(torch.ones(2)), _x(d).copy_(torch.ones(4, 3)))),
    Case("sort / topk / argsort", lambda d: (_x(d).sort(), _x(d).topk(2), _x(d).argsort())),
    Case("repeat_interleave with output_size",
         lambda d: d(H([1, 2])).repeat_interleave(d(H([2, 1])), output_size=3)),
    Case("a stable sort gives a complement without a sync",
         lambda d: torch.sort(_mask(d).to(torch.int8), stable=True).indices[:2]),
    Case("shape reads", lambda d: (_x(d).shape[0], _x(d).numel(), len(_x(d)))),
    # --- accepted, one sync each
    Case(".item()", lambda d: _x(d).sum().item(), syncs=1),
    Case(".tolist()", lambda d: _x(d).tolist(), syncs=1),
    Case(".cpu()", lambda d: _x(d).cpu(), syncs=1),
    Case(".to('cpu')", lambda d: _x(d).to("cpu"), syncs=1),
    Case("int() of a device scalar", lambda d: int(_x(d)[0, 0]), syncs=1),
    Case("bool() of a device scalar", lambda d: bool(_x(d).any()), syncs=1),
    Case("float() of a device scalar", lambda d: float(_x(d).max()), syncs=1),
    Case("copy_ into a host tensor", lambda d: torch.zeros(4, 3).copy_(_x(d)), syncs=1),
    Case("nonzero", lambda d: _mask(d).nonzero(), syncs=1),
    Case("device tensor indexed with a device mask", lambda d: _x(d)[_mask(d)], syncs=1),
    Case("device tensor written through a device mask",
         lambda d: _x(d).__setitem__(_mask(d), 0.0), syncs=1),
    Case("masked_select", lambda d: _x(d)[:, 0].masked_select(_mask(d)), syncs=1),
    Case("torch.equal", lambda d: torch.equal(_x(d), _x(d)), syncs=1),
    Case("repeat_interleave without output_size",
         lambda d: d(H([1, 2])).repeat_interleave(d(H([2, 1]))), syncs=1),
    Case("unique", lambda d: torch.unique(_idx(d)), syncs=1),
    Case("eigh (solver info check)",
         lambda d: torch.linalg.eigh(d(torch.eye(3))), syncs=1),
    Case("eigh in inference mode", lambda d: _inference(torch.linalg.eigh, d(torch.eye(3))),
         syncs=1),
    Case("svd in inference mode", lambda d: _inference(torch.linalg.svd, d(torch.eye(3))),
         syncs=1),
    Case("qr (no info check)", lambda d: _inference(torch.linalg.qr, d(torch.eye(3)))),
]


def _inference(fn: Callable[..., Any], *args: Any) -> Any:
    with torch.inference_mode():
        return fn(*args)


def _emulated(t: torch.Tensor) -> torch.Tensor:
    return t.to("cuda")


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_table_on_the_emulation(case: Case) -> None:
    with GpuEmulation() as emu:
        if case.refused:
            with pytest.raises(DeviceMixError):
                case.run(_emulated)
            return
        case.run(_emulated)
    assert len(emu.syncs) == case.syncs, emu.syncs


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_table_on_real_cuda(case: Case) -> None:  # pragma: no cover - GPU machines only
    def cuda(t: torch.Tensor) -> torch.Tensor:
        return t.to("cuda")

    if case.refused:
        with pytest.raises(RuntimeError):
            case.run(cuda)
            torch.cuda.synchronize()
        return
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            case.run(cuda)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    synced = any("synchronizing" in str(w.message) for w in caught)
    assert synced == (case.syncs > 0), [str(w.message) for w in caught]


def test_values_are_computed_for_real_and_devices_reported():
    with GpuEmulation() as emu:
        a = torch.arange(6.0, device="cuda").reshape(2, 3)
        with torch.device("cuda"):
            b = torch.ones(2, 3)
        c = (a + b) * 2
        assert c.device.type == "cuda" and c.is_cuda and isinstance(c, EmulatedTensor)
        assert torch.equal(host(c), (torch.arange(6.0).reshape(2, 3) + 1) * 2)
        back = c.cpu()
        assert type(back) is torch.Tensor and back.device.type == "cpu"
        assert torch.equal(back, host(c))
    assert [s.kind for s in emu.syncs] == ["copy to host"]
    assert emu.syncs[-1].where.startswith("test_gpu_emulation.py:")
    assert emu.h2d == 0


def test_modules_move_to_the_device_with_their_tensor_attributes():
    class M(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(3, 2)
            self.register_buffer("scale", torch.ones(2))
            self.cache = [torch.zeros(2), torch.zeros(2)]  # e.g. Qwen3-VL's deepstack buffers

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x) * self.scale + self.cache[0]

    m = emulate_module(M())
    assert all(isinstance(p, EmulatedTensor) for p in m.parameters())
    assert isinstance(m.scale, EmulatedTensor) and isinstance(m.cache[1], EmulatedTensor)
    with GpuEmulation(), torch.inference_mode():
        out = m(torch.ones(4, 3, device="cuda"))
        assert out.shape == (4, 2) and out.device.type == "cuda"
        with pytest.raises(DeviceMixError):
            m(torch.ones(4, 3))  # host activations into device weights


def test_scorer_timer_uses_device_events_without_syncing(monkeypatch):
    """CUDA path of metrics.ScorerTimer on the emulated device: events on the current stream,
    read back with the non-blocking query(); no device-to-host sync."""
    recorded: list[tuple[str, str, float]] = []
    timer = metrics.ScorerTimer(record=lambda m, mod, s: recorded.append((m, mod, s)))
    with GpuEmulation() as emu:
        x = torch.randn(64, 8, device="cuda")
        with timer.time("lrcp", "image", x.device):
            torch.linalg.vector_norm(x, dim=1).topk(8)
        assert timer.poll() == 1
    assert recorded and recorded[0][:2] == ("lrcp", "image") and recorded[0][2] >= 0
    assert emu.syncs == []


def test_syncs_are_attributed_to_the_plugin_or_vllm():
    from vllm_tokenprune.scoring._common import check_finite

    with GpuEmulation() as emu, emu.phase("scorer"):
        check_finite([torch.ones(3, 2, device="cuda")], "features")
    assert [(s.owner, s.phase) for s in emu.syncs] == [("plugin", "scorer")]
    assert emu.syncs[0].where.startswith("vllm_tokenprune/scoring/_common.py:")
