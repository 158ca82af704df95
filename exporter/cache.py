"""KV caches as the model sees them: where a layer's new keys and values go, and what it attends to.

Two layouts, matching the two `--cache-io` modes of an export:

- `ScatterCache` (in place): every layer's cache is a static `[B, H, S_max, D]` tensor and new
  entries are written at per-sequence indices. In an exported graph this is ONNX `TensorScatter`
  (opset 24), whose output TensorRT aliases to its input; the PyTorch runtime writes in place.
- `ConcatCache`: `present = concat(past, new)`, the fallback for engines older than TensorRT 10.15.

The attention masks that go with each layout are built here too, from per-sequence lengths.
"""

from __future__ import annotations

import torch


@torch.library.custom_op("blockrt::kv_write", mutates_args=())
def kv_write(cache: torch.Tensor, update: torch.Tensor, write_index: torch.Tensor) -> torch.Tensor:
    """Functional scatter of `update [B, H, T, D]` into `cache [B, H, S, D]` at rows
    `write_index[b] .. write_index[b] + T - 1` of each sequence (ONNX TensorScatter, axis -2)."""
    out = cache.clone()
    write_rows(out, update, write_index)
    return out


@kv_write.register_fake
def _kv_write_fake(cache, update, write_index):
    return torch.empty_like(cache)


def write_rows(cache: torch.Tensor, update: torch.Tensor, write_index: torch.Tensor) -> None:
    """In place: `update [B, H, T, D]` into rows write_index[b] .. write_index[b] + T - 1 of `cache`."""
    B, _, T, _ = update.shape
    rows = write_index[:, None] + torch.arange(T, device=cache.device)  # [B, T]
    batch = torch.arange(B, device=cache.device)[:, None]  # [B, 1]
    cache[batch, :, rows] = update.transpose(1, 2)  # indexed view is [B, T, H, D]


class ScatterCache:
    """Static-length caches written at `write_index`; `inplace=True` mutates the given tensors
    (PyTorch runtime), otherwise the functional op is used (export, reference)."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], write_index: torch.Tensor,
                 inplace: bool = False, attend_len: int | None = None):
        self.keys, self.values = list(keys), list(values)
        self.write_index = write_index
        self.inplace = inplace
        self.attend_len = attend_len  # attend to the first rows only (the rest are masked anyway)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.inplace:
            write_rows(self.keys[layer], k, self.write_index)
            write_rows(self.values[layer], v, self.write_index)
        else:
            self.keys[layer] = torch.ops.blockrt.kv_write(self.keys[layer], k, self.write_index)
            self.values[layer] = torch.ops.blockrt.kv_write(self.values[layer], v, self.write_index)
        k_all, v_all = self.keys[layer], self.values[layer]
        if self.attend_len is not None:
            k_all, v_all = k_all[:, :, : self.attend_len], v_all[:, :, : self.attend_len]
        return k_all, v_all


class ConcatCache:
    """Growing caches: each layer attends to `concat(past, new)`, which is also its new state."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor]):
        self.keys, self.values = list(keys), list(values)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.keys[layer] = torch.cat([self.keys[layer], k], dim=2)
        self.values[layer] = torch.cat([self.values[layer], v], dim=2)
        return self.keys[layer], self.values[layer]


def scatter_mask(write_index: torch.Tensor, num_new: int, cache_len: int) -> torch.Tensor:
    """Bool mask `[B, 1, T, S]` for a static cache: query j of sequence b (written at row
    write_index[b] + j) sees rows 0 .. write_index[b] + j."""
    device = write_index.device
    keys = torch.arange(cache_len, device=device)[None, None, None, :]
    queries = write_index[:, None, None, None] + torch.arange(num_new, device=device)[None, None, :, None]
    return keys <= queries


def concat_mask(key_mask: torch.Tensor, num_new: int) -> torch.Tensor:
    """Bool mask `[B, 1, T, P+T]` for a growing cache: `key_mask [B, P+T]` marks valid rows
    (past holes and padded new rows are 0); new rows are also causal among themselves."""
    total = key_mask.shape[1]
    past = total - num_new
    keys = torch.arange(total, device=key_mask.device)[None, None, None, :]
    queries = past + torch.arange(num_new, device=key_mask.device)[None, None, :, None]
    return (keys <= queries) & key_mask.bool()[:, None, None, :]
