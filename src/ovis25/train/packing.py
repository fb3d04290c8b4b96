"""Multimodal sequence packing.

Samples (text + visual tokens) are packed first-fit into sequences of at most `max_tokens`. A packed
batch is one row: position ids restart at every sample, `cu_seqlens` confines LLM attention to each
sample, and all images of all samples go through the ViT in one packed call. Targets are shifted per
sample before packing, so no sample ever predicts its neighbour's first token.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..constants import IGNORE_ID
from .data import TrainSample


def pack_first_fit(lengths: list[int], max_tokens: int, max_samples: int | None = None) -> list[list[int]]:
    """Bins of sample indices; each sample goes into the first open bin with room (order kept inside bins).

    O(n log n): a segment tree over the bins holds each subtree's largest free room, so the first bin with
    room is found by descending it (a scan of every open bin would make millions of samples take hours)."""
    size = 1
    while size < len(lengths):  # there are never more bins than samples
        size *= 2
    room = [-1] * (2 * size)  # leaves: each bin's free tokens, -1 when it takes nothing more (or is not open)
    bins: list[list[int]] = []
    for i, n in enumerate(lengths):
        if n > max_tokens:
            raise ValueError(f"sample {i} has {n} tokens, more than max_tokens={max_tokens}")
        if room[1] >= n:  # some open bin has room: go down to the leftmost one
            node = 1
            while node < size:
                node = 2 * node if room[2 * node] >= n else 2 * node + 1
            bins[node - size].append(i)
            free = room[node] - n
        else:
            node = size + len(bins)
            bins.append([i])
            free = max_tokens - n
        if max_samples is not None and len(bins[node - size]) >= max_samples:
            free = -1
        room[node] = free
        while node > 1:
            node //= 2
            room[node] = max(room[2 * node], room[2 * node + 1])
    return bins


def shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    """targets[i] = labels[i + 1]: what position i must predict (IGNORE_ID at the end)."""
    return F.pad(labels[1:], (0, 1), value=IGNORE_ID)


def _visuals(samples: list[TrainSample]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    pv = [s.pixel_values for s in samples if s.pixel_values is not None]
    grids = [s.grid_thws for s in samples if s.grid_thws is not None]
    return (torch.cat(pv), torch.cat(grids)) if pv else (None, None)


def collate_packed(samples: list[TrainSample]) -> dict:
    """One packed row: input_ids/targets/position_ids (1, T), cu_seqlens (S+1,), pixels of every sample."""
    lengths = [len(s.input_ids) for s in samples]
    pixel_values, grid_thws = _visuals(samples)
    return {
        "input_ids": torch.cat([s.input_ids for s in samples])[None],
        "targets": torch.cat([shifted_targets(s.labels) for s in samples])[None],
        "position_ids": torch.cat([torch.arange(n) for n in lengths])[None],
        "cu_seqlens": F.pad(torch.tensor(lengths).cumsum(0), (1, 0)).to(torch.int32),
        "pixel_values": pixel_values,
        "grid_thws": grid_thws,
    }


def collate_padded(samples: list[TrainSample], pad_id: int = 0) -> dict:
    """The unpacked alternative: a (B, Lmax) batch right-padded, with an attention mask."""
    longest = max(len(s.input_ids) for s in samples)
    ids = torch.full((len(samples), longest), pad_id, dtype=torch.long)
    targets = torch.full((len(samples), longest), IGNORE_ID, dtype=torch.long)
    mask = torch.zeros(len(samples), longest, dtype=torch.long)
    for i, s in enumerate(samples):
        n = len(s.input_ids)
        ids[i, :n], targets[i, :n], mask[i, :n] = s.input_ids, shifted_targets(s.labels), 1
    pixel_values, grid_thws = _visuals(samples)
    return {"input_ids": ids, "targets": targets, "attention_mask": mask, "pixel_values": pixel_values,
            "grid_thws": grid_thws}


def num_targets(batch: dict) -> int:
    return int((batch["targets"] != IGNORE_ID).sum())


def target_segments(batch: dict) -> torch.Tensor:
    """The packed sample (segment) index of every supervised target, in the order of `token_logps`."""
    lengths = batch["cu_seqlens"].diff().long()
    segment = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
    return segment[batch["targets"][0] != IGNORE_ID]
