"""The step modules: the single source of truth for every exported graph and the PyTorch engine.

Each step takes flat tensors in the order of `blockrt.graphs.contract.graph_io` and returns flat
tensors in the order of its outputs. `inplace=True` (PyTorch runtime only) writes the caches in
place and returns just the first output; the exported form is functional (TensorScatter or
concat), which TensorRT turns back into in-place updates.
"""

from __future__ import annotations

import torch
from torch import nn

from .cache import ConcatCache, ScatterCache, concat_mask, scatter_mask
from .model import BlockTransformer, GPTNeoXLM


class _Step(nn.Module):
    def __init__(self, model: nn.Module, cache_io: str = "inplace", inplace: bool = False, positions: str = "forward"):
        super().__init__()
        if inplace and cache_io != "inplace":
            raise ValueError("inplace execution needs cache_io='inplace'")
        self.model = model
        self.positions = positions  # token decoder rotary positions (a constant of the exported graph)
        self.concat = cache_io == "concat"
        self.inplace = inplace
        self.attend_len: int | None = None  # PyTorch runtime: attend to the first rows only

    def _cache(self, caches, write_index, num_new: int, attention_mask=None):
        keys, values = list(caches[0::2]), list(caches[1::2])
        if self.concat:
            return ConcatCache(keys, values), concat_mask(attention_mask, num_new)
        cache = ScatterCache(keys, values, write_index, inplace=self.inplace, attend_len=self.attend_len)
        if self.attend_len == num_new:  # set by the runtime only when every sequence starts at row 0
            return cache, None  # plain causal attention over the new rows
        return cache, scatter_mask(write_index, num_new, self.attend_len or keys[0].shape[2])

    def _result(self, first: torch.Tensor, cache):
        if self.inplace:
            return first
        return (first, *[t for kv in zip(cache.keys, cache.values) for t in kv])


class BlockStep(_Step):
    """block_decoder graph: embedder + block decoder + final LayerNorm + expansion layer."""

    model: BlockTransformer

    def forward(self, input_ids, past_len, new_len, *caches):
        attention_mask = caches[-1] if self.concat else None
        caches = caches[:-1] if self.concat else caches
        num_blocks = input_ids.shape[1] // self.model.config.block_len
        cache, mask = self._cache(caches, past_len, num_blocks, attention_mask)
        return self._result(self.model.block_step(input_ids, past_len, new_len, cache, mask), cache)


class TokenStep(_Step):
    """token_decoder graph: token embedding + token decoder + final LayerNorm + embed_out."""

    model: BlockTransformer

    def forward(self, input_ids, prefix_embeds, past_len, *caches):
        num_new = input_ids.shape[1]
        if self.concat:  # lockstep local positions: every row of the growing cache is valid
            total = caches[0].shape[2] + num_new
            key_mask = torch.ones(input_ids.shape[0], total, dtype=torch.long, device=input_ids.device)
            cache, mask = self._cache(caches, past_len, num_new, key_mask)
        else:
            cache, mask = self._cache(caches, past_len, num_new)
        logits = self.model.token_step(input_ids, prefix_embeds, past_len, cache, mask, self.positions)
        # the PyTorch runtime samples from the model dtype (greedy: the same argmax, without an fp32 copy)
        return self._result(logits if self.inplace else logits.float(), cache)


class DecoderStep(_Step):
    """decoder graph of a vanilla model: embedding + layers + final LayerNorm + embed_out."""

    model: GPTNeoXLM

    def forward(self, input_ids, past_len, new_len, *caches):
        attention_mask = caches[-1] if self.concat else None
        caches = caches[:-1] if self.concat else caches
        cache, mask = self._cache(caches, past_len, input_ids.shape[1], attention_mask)
        return self._result(self.model.decoder_step(input_ids, past_len, new_len, cache, mask).float(), cache)


def step_modules(model: nn.Module, cache_io: str = "inplace", inplace: bool = False,
                 positions: str = "forward") -> dict[str, _Step]:
    """Graph name -> step module for a model (block: two graphs, vanilla: one). `positions`: the
    token decoder's rotary positions (`model.token_positions`; a vanilla model has one kind)."""
    if isinstance(model, BlockTransformer):
        return {"block_decoder": BlockStep(model, cache_io, inplace, positions),
                "token_decoder": TokenStep(model, cache_io, inplace, positions)}
    return {"decoder": DecoderStep(model, cache_io, inplace, positions)}
