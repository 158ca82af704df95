"""Generation requests: their parameters (`GenerationConfig`), the one check of a request against
what a generator can run (`check_request`), and token sampling, shared by the reference and the
runtime.

Sampling runs on whatever device the logits are on, with one row per sequence and per-row
parameters (so a server can batch requests with different settings). Randomness is counter based:
the draw for a row depends only on its stream seed and on how many tokens that sequence has
generated, never on its neighbours' tokens, and needs no generator state (CUDA-graph friendly).

Seeds are per request: a request with `seed` s draws from stream `stream_seed(s)`, whatever its
position in a batch, so a seeded request gives the same tokens alone or batched, offline or
through a server. Two prompts of one call with the same config therefore share a stream (the same
prompt twice gives the same sample twice); give each its own `GenerationConfig(seed=...)` for
different samples.
"""

from __future__ import annotations

import array
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from blockrt.errors import UserError

# Rotary positions of the token decoder (see blockrt.exporter.model.token_positions): "forward", the
# positions of the training forward pass (blockrt's default), or "official-generate", those the
# official BlockTransformer.generate() gives through Hugging Face generate.
POSITIONS = ("forward", "official-generate")


def to_device(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host list as a device tensor without stalling the host: on CUDA the copy goes through
    pinned memory and is queued behind the GPU work already launched (a plain `torch.tensor(...,
    device="cuda")` waits for the GPU to drain first). Lists go through numpy, which converts
    nested Python lists several times faster than `torch.tensor` (a prefill's ids: 128 x 2048)."""
    t = torch.from_numpy(np.asarray(values)).to(dtype) if len(values) else torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


class RequestError(UserError):
    """A prompt or generation parameter that cannot run. `field` names it: "prompt" or a
    `GenerationConfig` field ("max_new_tokens", "stop_token_ids", ...)."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class ContextTooLong(RequestError):
    """The block-padded prompt plus max_new_tokens does not fit the context."""


@dataclass
class GenerationConfig:
    """How to generate. temperature 0 is greedy; top_k 0 and top_p 1 turn those filters off."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int = 0
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    positions: str | None = None  # "forward" | "official-generate"; None: the model's (reference: forward)

    def validate(self, vocab_size: int | None = None) -> None:
        """Raise RequestError naming the first invalid field."""
        def bad(name: str, message: str):
            raise RequestError(message, name)

        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            bad("max_new_tokens", f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not self.temperature >= 0:
            bad("temperature", f"temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            bad("top_k", f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            bad("top_p", f"top_p must be in (0, 1], got {self.top_p!r}")
        if not self.repetition_penalty > 0:
            bad("repetition_penalty", f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            bad("seed", f"seed must be an integer >= 0, got {self.seed!r}")
        if self.positions is not None and self.positions not in POSITIONS:
            bad("positions", f"positions must be one of {', '.join(POSITIONS)}, got {self.positions!r}")
        for t in self.stop_token_ids:
            if not isinstance(t, int) or t < 0 or (vocab_size is not None and t >= vocab_size):
                bad("stop_token_ids", f"stop token id {t!r} is outside the vocabulary [0, {vocab_size})")

    def stop_ids(self, eos_token_id: int) -> list[int]:
        ids = list(self.stop_token_ids)
        if not self.ignore_eos and eos_token_id not in ids:
            ids.append(eos_token_id)
        return ids


@dataclass(frozen=True)
class RequestLimits:
    """What a generator can run: token ids below `vocab_size`; prompts left-padded to a multiple of
    `block_len` (1 for vanilla models) plus max_new_tokens within `max_context`; at most
    `stop_slots` stop ids per request, EOS included (unless ignored); the token decoder's
    `positions`, fixed at export (a request may leave them unset or ask for the same)."""

    vocab_size: int
    block_len: int
    max_context: int
    eos_token_id: int
    stop_slots: int
    positions: str = "forward"


def padded_len(prompt_len: int, block_len: int) -> int:
    """A prompt's length once left-padded to whole blocks (docs/model.md): what it takes of the context."""
    return prompt_len + (-prompt_len % block_len)


def prompt_ids(prompt: Sequence[int], vocab_size: int) -> np.ndarray:
    """The prompt as a checked int64 array, or RequestError (field "prompt"): empty, not a flat
    list of integers, or ids outside the vocabulary. Every Python int is touched once (a list goes
    through `array` in C, no numpy conversion); prompts can be thousands of tokens, and the runtime
    builds its prefill ids from this array by copying memory."""
    if isinstance(prompt, (list, tuple)):
        try:
            ids = np.frombuffer(array.array("q", prompt), dtype=np.int64)
        except (TypeError, OverflowError):
            raise RequestError(f"a prompt must be a flat list of integer token ids, got {str(prompt)[:60]}",
                               "prompt") from None
    else:
        ids = np.array(prompt)  # a copy: the caller may change its own array later
    if ids.size == 0:
        raise RequestError("empty prompt: every prompt needs at least one token id", "prompt")
    if ids.ndim != 1 or ids.dtype.kind not in "iu":
        raise RequestError(f"a prompt must be a flat list of integer token ids, got {str(prompt)[:60]}", "prompt")
    if ids.min() < 0 or ids.max() >= vocab_size:
        bad = ids[(ids < 0) | (ids >= vocab_size)][:5].tolist()
        raise RequestError(f"prompt has token ids outside the vocabulary [0, {vocab_size}): {bad}", "prompt")
    return ids.astype(np.int64, copy=False)


def check_prompt(prompt: Sequence[int], vocab_size: int) -> list[int]:
    """The prompt as a list of ints, checked by `prompt_ids`."""
    ids = prompt_ids(prompt, vocab_size)
    return list(prompt) if isinstance(prompt, (list, tuple)) else ids.tolist()


def check_request(prompt: Sequence[int], config: GenerationConfig, limits: RequestLimits) -> np.ndarray:
    """The one check of a request (used by `Generator.add` and the server before it queues one):
    returns the prompt's ids (`prompt_ids`), or raises RequestError naming the prompt or the field at
    fault (ContextTooLong when prompt and max_new_tokens do not fit the context)."""
    ids = prompt_ids(prompt, limits.vocab_size)
    config.validate(limits.vocab_size)
    n = len(ids)
    padded = padded_len(n, limits.block_len)
    total = padded + config.max_new_tokens
    if total > limits.max_context:
        raise ContextTooLong(f"prompt too long: {n} prompt tokens (padded to {padded} for blocks of {limits.block_len}) "
                             f"+ max_new_tokens {config.max_new_tokens} = {total} exceeds the max context of "
                             f"{limits.max_context} tokens; shorten the prompt or lower max_new_tokens (an export "
                             f"with a larger --max-context runs longer ones)", "prompt")
    if len(config.stop_ids(limits.eos_token_id)) > limits.stop_slots:
        raise RequestError(f"at most {limits.stop_slots - 1} stop token ids are supported", "stop_token_ids")
    if config.positions not in (None, limits.positions):
        raise RequestError(f"positions {config.positions!r} asked for, but this model's token decoder uses "
                           f"{limits.positions!r} positions (fixed at export): re-export with "
                           f"--positions {config.positions}, or leave positions unset", "positions")
    return ids


def stream_seed(seed: int) -> int:
    """The random stream of a request whose `GenerationConfig.seed` is `seed` (the same for a
    request alone or at any position of a batch)."""
    return (seed * 1_000_003) % (2**31 - 1)


class SamplingState:
    """Per-row sampling parameters (and token history for the repetition penalty) for a fixed
    number of rows, on the device of the logits. Rows are assigned when a sequence joins."""

    def __init__(self, capacity: int, vocab_size: int, device: torch.device | str, stop_width: int = 4):
        self.vocab_size, self.device = vocab_size, torch.device(device)
        self.temperature = torch.zeros(capacity, dtype=torch.float32, device=device)  # 0 = greedy
        self.top_k = torch.zeros(capacity, dtype=torch.int64, device=device)  # 0 = off
        self.top_p = torch.ones(capacity, dtype=torch.float32, device=device)
        self.repetition_penalty = torch.ones(capacity, dtype=torch.float32, device=device)
        self.seed = torch.zeros(capacity, dtype=torch.int64, device=device)
        self.stop_ids = torch.full((capacity, stop_width), -1, dtype=torch.int64, device=device)
        self.seen: torch.Tensor | None = None  # [C, V] bool, allocated on first use of a penalty
        self.configs: list[GenerationConfig | None] = [None] * capacity
        self._refresh()

    @classmethod
    def create(cls, configs: list[GenerationConfig], prompts: list[list[int]], vocab_size: int,
               eos_token_id: int, device: torch.device | str) -> "SamplingState":
        width = max(1, max(len(c.stop_ids(eos_token_id)) for c in configs))
        state = cls(len(configs), vocab_size, device, stop_width=width)
        state.assign(list(range(len(configs))), configs, prompts, eos_token_id)
        return state

    def assign(self, rows: list[int], configs: list[GenerationConfig], prompts: list[list[int]],
               eos_token_id: int) -> None:
        """Give rows their parameters; each row's random stream is `stream_seed` of its config's seed."""
        index = to_device(rows, torch.long, self.device)

        def put(tensor, values):
            tensor[index] = to_device(values, tensor.dtype, self.device)

        put(self.temperature, [c.temperature for c in configs])
        put(self.top_k, [c.top_k for c in configs])
        put(self.top_p, [c.top_p for c in configs])
        put(self.repetition_penalty, [c.repetition_penalty for c in configs])
        put(self.seed, [stream_seed(c.seed) for c in configs])
        stops = [c.stop_ids(eos_token_id)[: self.stop_ids.shape[1]] for c in configs]
        put(self.stop_ids, [s + [-1] * (self.stop_ids.shape[1] - len(s)) for s in stops])
        if any(c.repetition_penalty != 1.0 for c in configs) and self.seen is None:
            self.seen = torch.zeros(len(self.configs), self.vocab_size, dtype=torch.bool, device=self.device)
        if self.seen is not None:
            self.seen[index] = False
            for row, p in zip(rows, prompts):
                self.seen[row, to_device(p, torch.long, self.device)] = True
        for row, c in zip(rows, configs):
            self.configs[row] = c
        self._refresh()

    def move(self, dst: list[int], src: list[int]) -> None:
        """Copy rows src -> dst (batch compaction)."""
        d = to_device(dst, torch.long, self.device)
        s = to_device(src, torch.long, self.device)
        for t in (self.temperature, self.top_k, self.top_p, self.repetition_penalty, self.seed, self.stop_ids, self.seen):
            if t is not None:
                t[d] = t[s]
        for a, b in zip(dst, src):
            self.configs[a] = self.configs[b]
        self._refresh()

    def head(self, n: int) -> "SamplingState":
        """A view of rows [0, n)."""
        view = SamplingState.__new__(SamplingState)
        view.vocab_size, view.device = self.vocab_size, self.device
        for name in ("temperature", "top_k", "top_p", "repetition_penalty", "seed", "stop_ids"):
            setattr(view, name, getattr(self, name)[:n])
        view.seen = None if self.seen is None else self.seen[:n]
        view.configs = self.configs[:n]
        return view._refresh()

    def rows(self, index: torch.Tensor) -> "SamplingState":
        """A copy holding the given rows."""
        view = SamplingState.__new__(SamplingState)
        view.vocab_size, view.device = self.vocab_size, self.device
        for name in ("temperature", "top_k", "top_p", "repetition_penalty", "seed", "stop_ids"):
            setattr(view, name, getattr(self, name)[index])
        view.seen = None if self.seen is None else self.seen[index]
        view.configs = [self.configs[int(i)] for i in index]
        return view._refresh()

    def _refresh(self) -> "SamplingState":
        """Host-side flags that let `sample` skip work no row needs."""
        live = [c for c in self.configs if c is not None]
        self.any_sampling = any(c.temperature > 0 for c in live)
        self.any_filter = any(c.temperature > 0 and (c.top_k > 0 or c.top_p < 1) for c in live)
        self.any_penalty = any(c.repetition_penalty != 1.0 for c in live)
        return self


_MASK32 = 0xFFFFFFFF


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixer (lowbias32) on int64 tensors; every product stays below 2**63."""
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def uniform_noise(seed: torch.Tensor, step: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Uniform (0, 1) noise [B, V], a pure function of (seed[b], step[b], token id)."""
    base = _hash32(seed * 0x9E3779B1 + step * 0x632BE5AB)  # [B]
    ids = torch.arange(vocab_size, device=seed.device, dtype=torch.int64)
    bits = _hash32(base[:, None] ^ _hash32(ids + 0x165667B1)[None, :])
    return (bits.to(torch.float32) + 0.5) / 4294967296.0


def sample(logits: torch.Tensor, state: SamplingState, step: torch.Tensor) -> torch.Tensor:
    """Next token ids [B] from logits [B, V] (float32, or the model's dtype: greedy rows take their
    argmax as given, which is the argmax of the exact fp32 copy; sampling works in fp32). `step`
    [B] is each row's count of tokens generated so far (the random stream position)."""
    logits = penalize(logits, state)
    greedy = logits.argmax(dim=-1)
    if not state.any_sampling:
        return greedy
    logits = logits.float()
    temperature = state.temperature.clamp(min=1e-5)[:, None]
    scaled = logits / temperature
    if state.any_filter:
        scaled = _filter_top_k_top_p(scaled, state.top_k, state.top_p)
    gumbel = -torch.log(-torch.log(uniform_noise(state.seed, step, logits.shape[-1])))
    sampled = (scaled + gumbel).argmax(dim=-1)  # Gumbel-max: a draw from softmax(scaled)
    return torch.where(state.temperature > 0, sampled, greedy)


def penalize(logits: torch.Tensor, state: SamplingState) -> torch.Tensor:
    """The repetition penalty: logits of tokens a row has seen (prompt or generated) are divided
    by its penalty where positive and multiplied where negative (as transformers'
    `RepetitionPenaltyLogitsProcessor`); rows with penalty 1 are unchanged."""
    if state.seen is None or not state.any_penalty:
        return logits
    logits = logits.float()
    penalty = state.repetition_penalty[:, None]
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(state.seen, penalized, logits)


def _filter_top_k_top_p(scaled: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    sorted_logits, _ = scaled.sort(dim=-1, descending=True)
    V = scaled.shape[-1]
    k = torch.where(top_k > 0, top_k.clamp(max=V), torch.full_like(top_k, V))
    kth = sorted_logits.gather(1, (k - 1)[:, None])  # [B, 1] smallest kept value under top-k
    probs = sorted_logits.softmax(dim=-1)
    # keep the smallest prefix whose mass reaches top_p (the first token always stays)
    before = probs.cumsum(dim=-1) - probs
    keep_sorted = before < top_p[:, None]
    cutoff = torch.where(keep_sorted, sorted_logits, torch.full_like(sorted_logits, float("inf"))).amin(dim=-1, keepdim=True)
    threshold = torch.maximum(kth, cutoff)
    return scaled.masked_fill(scaled < threshold, float("-inf"))


def stopped(tokens: torch.Tensor, state: SamplingState) -> torch.Tensor:
    """[B] bool: the token just generated is one of the row's stop ids."""
    return (tokens[:, None] == state.stop_ids).any(dim=-1)


def mark_seen(state: SamplingState, tokens: torch.Tensor) -> None:
    if state.seen is not None:
        state.seen[torch.arange(tokens.shape[0], device=tokens.device), tokens] = True
