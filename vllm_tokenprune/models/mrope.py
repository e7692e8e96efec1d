"""M-RoPE rows of pruned items: kept rows carry their unpruned positions as extra channels, and
``recompute_mrope_positions`` puts them in place (runs in the worker).

Mixed into :class:`.model_hooks.TokenPruneModelMixin` (whose selection :meth:`_tp_prune` uses);
called by the Qwen-VL families (:mod:`._qwen`, :mod:`.qwen3_vl`). The rows' positions travel
as :data:`.wire.POS_CHANNELS` channels (base-256 digits, exact in bf16), as vLLM's EVS video
pruning does; the fill itself is :func:`.positions.fill_media_positions`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vllm_tokenprune.models import fallbacks, faults
from vllm_tokenprune.models.positions import fill_media_positions, full_positions
from vllm_tokenprune.models.wire import (
    MAX_POSITION,
    POS_CHANNELS,
    Grid,
    decode_positions,
    encode_positions,
)
from vllm_tokenprune.scoring import LAYER


class MropeRowsMixin:
    """The M-RoPE side of the model's hooks (see the module docstring)."""

    def _tp_prune(
        self,
        modality: str,
        embeds: Sequence[torch.Tensor],
        grids: Sequence[Grid],
        t_factors: Sequence[float],
        params: torch.Tensor | None,
        text_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, ...]:
        """M-RoPE models: select each item's kept rows; append their encoded unpruned
        positions (``grids``: the items' LM token grids, ``t_factors``: time-step scaling).

        Positions are built on the host, checked there, moved to the rows' device and gathered
        there with the device indices: no device-to-host sync. An item whose rows do not match
        its grid (a count-mismatch fallback) gets grid positions spread like its rows."""
        embeds = faults.shorten_for_test(embeds, params)
        items = self._tp_params(  # type: ignore[attr-defined]
            params, [e.shape[0] for e in embeds], grids)
        keep = self._tp_select(  # type: ignore[attr-defined]
            modality, [self._tp_score_view(e) for e in embeds],  # type: ignore[attr-defined]
            items, text_ids)
        out = []
        for i, emb in enumerate(embeds):
            t, h, w = grids[i]
            pos = self._tp_host_positions(full_positions(t, h, w, t_factors[i])[:, :3])
            idx = keep[i]
            n_rows = int(emb.shape[0])
            if pos.shape[0] != n_rows:  # rows and grid disagree: spread the grid like the rows
                spread = idx.shape[0] if idx is not None else n_rows
                pos = pos.index_select(0, fallbacks.uniform_fallback(pos.shape[0], spread))
                idx_pos = None
            else:
                idx_pos = idx
            pos = pos.to(emb.device, non_blocking=True)
            if idx is not None:
                emb = emb.index_select(0, idx)
                if idx_pos is not None:
                    pos = pos.index_select(0, idx_pos)
            elif items[i].stage == LAYER:
                emb = self._tp_layer_rows(  # type: ignore[attr-defined]
                    emb, items[i], modality=modality)
            out.append(self._tp_with_positions(emb, pos))
        return tuple(out)

    @staticmethod
    def _tp_host_positions(pos: torch.Tensor) -> torch.Tensor:
        """(n, 3) host positions, clamped (and counted) where the encoding cannot hold them
        (the processor refuses such items; never crash here)."""
        if pos.numel() and int(pos.max()) >= MAX_POSITION:
            fallbacks.report_fallback("-", fallbacks.POSITION_OVERFLOW,
                                  f"a relative position >= {MAX_POSITION}")
            pos = pos.clamp(max=MAX_POSITION - 1)
        return pos

    @classmethod
    def _tp_with_positions(cls, rows: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Append (n, 3) relative positions to (n, D) rows as POS_CHANNELS channels (host
        positions are checked; device ones were checked before they were moved)."""
        if pos.device.type == "cpu":
            pos = cls._tp_host_positions(pos)
        enc = encode_positions(pos, rows.dtype, check=False)
        enc = enc.to(rows.device, non_blocking=True)
        return torch.cat([rows, enc], dim=1)

    def _tp_recompute_mrope_positions(
        self,
        input_ids: list[int] | torch.Tensor,
        multimodal_embeddings: Sequence[torch.Tensor],
        mrope_positions: torch.Tensor,
        num_computed_tokens: int,
        *,
        media_token_ids: Sequence[int],
    ) -> tuple[Sequence[torch.Tensor], torch.Tensor, int]:
        """``SupportsMultiModalPruning.recompute_mrope_positions`` for pruned media.

        ``mrope_positions`` already holds the right positions for every text token (see
        :func:`.positions.mrope_positions_for_spans`); this fills in the real positions of the
        kept media slots whose embeddings this step carries
        (:func:`.positions.fill_media_positions`). V1 passes the prompt as a list and host
        positions, V2 device tensors: whatever is on the device comes to the host in one copy
        (the call's only sync). If the fill fails, the rows keep the prompt's provisional
        positions (a fallback, counted), never an exception.
        """
        if faults.fault_for_test(faults.FAULT_NO_RECOMPUTE,
                                sum(int(mm.shape[0]) for mm in multimodal_embeddings)):
            return list(multimodal_embeddings), mrope_positions, self._tp_delta(
                mrope_positions)  # as if the runner had not called this
        embeds = [mm[:, :-POS_CHANNELS] for mm in multimodal_embeddings]
        if not multimodal_embeddings:
            positions = mrope_positions.clone()
            return embeds, positions, self._tp_delta(positions)
        rel_dev = torch.cat([mm[:, -POS_CHANNELS:] for mm in multimodal_embeddings])
        ids_host, positions_cpu, rel = _to_host(input_ids, mrope_positions,
                                                decode_positions(rel_dev))
        delta = int(positions_cpu.max()) + 1 - positions_cpu.shape[1]
        try:
            faults.fault_for_test(faults.FAULT_POSITIONS, int(rel.shape[1]), raise_=True)
            positions_cpu = fill_media_positions(
                ids_host, rel, positions_cpu, num_computed_tokens, media_token_ids)
            delta = int(positions_cpu.max()) + 1 - positions_cpu.shape[1]
        except Exception as e:  # noqa: BLE001 - a request's positions must not kill the engine
            fallbacks.report_fallback("-", fallbacks.POSITIONS, str(e),
                                  "its tokens keep the prompt's provisional positions")
        return embeds, positions_cpu.to(mrope_positions.device, non_blocking=True), delta

    @staticmethod
    def _tp_delta(positions: torch.Tensor) -> int:
        return int(positions.max()) + 1 - positions.shape[1]


def _to_host(input_ids: list[int] | torch.Tensor, positions: torch.Tensor, rel: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, positions, rel) as host int64 tensors, the device ones copied in one transfer."""
    ids = input_ids if isinstance(input_ids, torch.Tensor) else torch.tensor(
        input_ids, dtype=torch.long)
    parts = [ids.reshape(-1).long(), positions.reshape(-1).long(), rel.reshape(-1).long()]
    on_device = [p.device.type != "cpu" for p in parts]
    if any(on_device):
        dev = next(p.device for p, d in zip(parts, on_device, strict=True) if d)
        moved = torch.cat([p.to(dev, non_blocking=True) for p, d in zip(
            parts, on_device, strict=True) if d]).to("cpu")
        sizes = [int(p.numel()) for p, d in zip(parts, on_device, strict=True) if d]
        chunks = iter(moved.split(sizes))
        parts = [next(chunks) if d else p for p, d in zip(parts, on_device, strict=True)]
    return (parts[0], parts[1].reshape(positions.shape).clone(),
            parts[2].reshape(rel.shape))
