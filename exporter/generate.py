"""Reference generation in eager PyTorch: the semantics every other path is checked against.

`generate(model, prompts, config)` works for both model kinds, batches of ragged prompts and the
sampling options of `GenerationConfig`. With `use_cache=True` it runs the block/token steps with
KV caches; with `use_cache=False` it recomputes every next-token distribution from the
teacher-forced `forward`, which shares no cache code and so checks the cached path.
`config.positions` picks the token decoder's rotary positions: the training forward's by default,
or "official-generate" for those of the official generate() (`model.token_positions`).

An independent oracle on purpose: it pads prompts, orders the prefill, token and block steps, and
tracks positions and stops with code of its own, sharing none of that with the runtime's
`Generator` or `blockrt verify` (which share `blockrt.runtime.engine.prefill_inputs` and
`local_position`), so a mistake there cannot hide by being made twice. It shares only the model,
the request checks and the sampler (`blockrt.generation`), which tests check against
independent references of their own (tests/test_references.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from blockrt.generation import GenerationConfig, RequestError, SamplingState, check_prompt, mark_seen, sample, stopped

from .cache import ScatterCache, scatter_mask
from .config import NeoXConfig
from .model import BlockTransformer, GPTNeoXLM


@dataclass
class ReferenceOutput:
    tokens: list[list[int]]  # generated ids per prompt (a stop token, when hit, is the last one)
    finish_reasons: list[str]  # "stop" or "length"
    logits: list[list[torch.Tensor]] | None = None  # per prompt, the float32 logits of each token


def pad_to_block(prompt: list[int], block_len: int, pad_token_id: int) -> list[int]:
    """Left-pad a prompt with the pad id to a multiple of the block length (docs/model.md)."""
    return [pad_token_id] * (-len(prompt) % block_len) + list(prompt)


def check_prompts(prompts: list[list[int]], vocab_size: int) -> list[list[int]]:
    """Each prompt checked by `check_prompt`; a RequestError names the prompt's index."""
    if not prompts:
        raise RequestError("no prompts given: pass at least one prompt of token ids", "prompt")
    checked = []
    for i, p in enumerate(prompts):
        try:
            checked.append(check_prompt(p, vocab_size))
        except RequestError as e:
            raise RequestError(f"prompt {i}: {e}", "prompt") from None
    return checked


class _Outputs:
    """Collects tokens per row until each row stops."""

    def __init__(self, batch: int, config: GenerationConfig, record_logits: bool):
        self.tokens = [[] for _ in range(batch)]
        self.reasons = ["length"] * batch
        self.logits = [[] for _ in range(batch)] if record_logits else None
        self.done = [False] * batch
        self.max_new = config.max_new_tokens

    def add(self, logits: torch.Tensor, tokens: torch.Tensor, stop: torch.Tensor, rows=None) -> None:
        rows = range(len(self.tokens)) if rows is None else rows
        for i, row in enumerate(rows):
            if self.done[row]:
                continue
            self.tokens[row].append(int(tokens[i]))
            if self.logits is not None:
                self.logits[row].append(logits[i].float().cpu())
            if bool(stop[i]):
                self.done[row], self.reasons[row] = True, "stop"
            elif len(self.tokens[row]) >= self.max_new:
                self.done[row] = True

    @property
    def all_done(self) -> bool:
        return all(self.done)

    def result(self) -> ReferenceOutput:
        return ReferenceOutput(self.tokens, self.reasons, self.logits)


@torch.no_grad()
def generate(model: BlockTransformer | GPTNeoXLM, prompts: list[list[int]], config: GenerationConfig,
             use_cache: bool = True, record_logits: bool = False) -> ReferenceOutput:
    cfg = model.config
    check_prompts(prompts, cfg.vocab_size)
    config.validate(cfg.vocab_size)
    device = next(model.parameters()).device
    state = SamplingState.create([config] * len(prompts), prompts, cfg.vocab_size, cfg.eos_token_id, device)
    out = _Outputs(len(prompts), config, record_logits)
    positions = config.positions or "forward"
    if not use_cache:
        _generate_recompute(model, prompts, state, out, positions)
    elif isinstance(model, BlockTransformer):
        _generate_block(model, prompts, state, out, positions)
    else:
        _generate_vanilla(model, prompts, state, out)
    return out.result()


def _empty_cache(stack: NeoXConfig, batch: int, length: int, like: torch.Tensor, write_index) -> ScatterCache:
    def zeros():
        return torch.zeros(batch, stack.num_heads, length, stack.head_dim, dtype=like.dtype, device=like.device)

    layers = range(stack.num_layers)
    return ScatterCache([zeros() for _ in layers], [zeros() for _ in layers], write_index, inplace=True)


def _right_pad(rows: list[list[int]], pad: int, device) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [pad] * (width - len(r)) for r in rows], dtype=torch.long, device=device)


def _next(logits: torch.Tensor, state: SamplingState, step: torch.Tensor):
    tokens = sample(logits, state, step)
    mark_seen(state, tokens)
    return tokens, stopped(tokens, state)


def _generate_block(model: BlockTransformer, prompts, state: SamplingState, out: _Outputs, positions: str) -> None:
    cfg = model.config
    L = cfg.block_len
    weight = model.token_decoder.gpt_neox.final_layer_norm.weight  # dtype and device (never quantized)
    device = weight.device
    padded = [pad_to_block(p, L, cfg.pad_token_id) for p in prompts]
    B = len(prompts)
    blocks = torch.tensor([len(p) // L for p in padded], device=device)
    capacity = int(blocks.max()) + math.ceil(out.max_new / L) + 1
    zero = torch.zeros(B, dtype=torch.long, device=device)
    block_cache = _empty_cache(cfg.block_decoder, B, capacity, weight, zero)
    token_cache = _empty_cache(cfg.token_decoder, B, L + 1, weight, zero)
    step = torch.zeros(B, dtype=torch.long, device=device)

    ids = _right_pad(padded, cfg.pad_token_id, device)  # prefill: all prompt blocks at once
    mask = scatter_mask(zero, ids.shape[1] // L, capacity)
    prefix = model.block_step(ids, zero, blocks, block_cache, mask)
    while True:
        local = zero.clone()
        ids = torch.zeros(B, 2, dtype=torch.long, device=device)  # positions 0, 1 take the prefix
        new_block = []
        for _ in range(L):
            token_cache.write_index = local
            logits = model.token_step(ids, prefix, local, token_cache, scatter_mask(local, ids.shape[1], L + 1),
                                      positions)
            tokens, stop = _next(logits.float(), state, step)
            out.add(logits, tokens, stop)
            if out.all_done:
                return
            step += 1
            local = local + ids.shape[1]
            ids = tokens[:, None]
            new_block.append(tokens)
        block_cache.write_index = blocks
        one = torch.ones_like(blocks)
        prefix = model.block_step(torch.stack(new_block, dim=1), blocks, one, block_cache,
                                  scatter_mask(blocks, 1, capacity))
        blocks = blocks + 1


def _generate_vanilla(model: GPTNeoXLM, prompts, state: SamplingState, out: _Outputs) -> None:
    cfg = model.config
    weight = model.gpt_neox.final_layer_norm.weight  # dtype and device (never quantized)
    device = weight.device
    B = len(prompts)
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    capacity = int(lengths.max()) + out.max_new + 1
    zero = torch.zeros(B, dtype=torch.long, device=device)
    cache = _empty_cache(cfg.decoder, B, capacity, weight, zero)
    step = torch.zeros(B, dtype=torch.long, device=device)
    ids, past, new = _right_pad(prompts, cfg.pad_token_id, device), zero, lengths
    while True:
        cache.write_index = past
        logits = model.decoder_step(ids, past, new, cache, scatter_mask(past, ids.shape[1], capacity))
        tokens, stop = _next(logits.float(), state, step)
        out.add(logits, tokens, stop)
        if out.all_done:
            return
        step += 1
        past, new, ids = past + new, torch.ones_like(new), tokens[:, None]


def _generate_recompute(model, prompts, state: SamplingState, out: _Outputs, positions: str) -> None:
    """No caches: each next-token distribution comes from the teacher-forced forward of the
    whole sequence so far, one sequence at a time."""
    cfg = model.config
    device = next(model.parameters()).device
    for row, prompt in enumerate(prompts):
        rows = torch.tensor([row], device=device)
        row_state = state.rows(rows)
        seq = pad_to_block(prompt, cfg.block_len, cfg.pad_token_id) if cfg.kind == "block" else list(prompt)
        step = torch.zeros(1, dtype=torch.long, device=device)
        while not out.done[row]:
            logits = _next_logits(model, seq, positions)
            tokens, stop = _next(logits, row_state, step)
            out.add(logits, tokens, stop, rows=[row])
            seq.append(int(tokens[0]))
            step += 1


def _next_logits(model, seq: list[int], positions: str) -> torch.Tensor:
    device = next(model.parameters()).device
    if isinstance(model, GPTNeoXLM):
        return model(torch.tensor([seq], device=device))[:, -1].float()
    L, pad = model.config.block_len, model.config.pad_token_id
    complete, partial = divmod(len(seq), L)
    # predicting token `partial` of block `complete`: append that block, padded (causal, unseen)
    ids = seq + [pad] * (L - partial)
    logits = model(torch.tensor([ids], device=device), positions)  # [1, complete, L, V]
    return logits[:, complete - 1, partial].float()
