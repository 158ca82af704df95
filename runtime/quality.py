"""Quality of a quantized model against its unquantized reference, teacher-forced on fixed sequences.

`teacher_forced_logits` drives an artifact's engines (any backend, through the `Engine` interface
and runtime-owned caches) over whole sequences, feeding the true tokens, and returns the logits of
every next-token prediction in the layout of the reference's teacher-forced forward
(`[B, N-1, L, V]` for block models, `[B, T-1, V]` for vanilla ones). `compare_logits` reduces two
such tensors to the numbers `blockrt verify` reports: mean KL divergence of the next-token
distributions KL(reference || quantized), top-1 agreement and max logit error.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from blockrt.graphs.manifest import Manifest

from .engine import Engine

# Limits per quantization mode, for `blockrt verify`: (max mean KL in nats, min top-1 agreement at
# confident positions). Top-1 agreement is only meaningful where the reference prefers one token
# clearly: random weights give near-uniform distributions whose near-ties any error flips.
QUALITY_LIMITS = {"int8-wo": (1e-3, 0.98), "fp8": (1e-2, 0.95), "int4-wo": (5e-2, 0.9)}
CONFIDENT_MARGIN = 0.5  # nats between the reference's top-1 and top-2 log-probabilities
SEQUENCES, BLOCKS = 4, 8  # fixed evaluation sequences: 4 x 8 blocks (vanilla: 32 tokens)


@dataclass
class Quality:
    positions: int
    mean_kl: float
    top1_agreement: float  # over all positions
    confident: int  # positions where the reference's top-1 leads by CONFIDENT_MARGIN
    confident_top1_agreement: float  # over those (1.0 if there are none)
    max_logit_error: float


def fixed_sequences(manifest: Manifest, seed: int = 4321) -> list[list[int]]:
    """Deterministic random sequences that fit the artifact's batch and context limits."""
    L = manifest.block_len
    length = min(BLOCKS * (L if manifest.kind == "block" else 4), manifest.limits.max_context) // L * L
    gen = torch.Generator().manual_seed(seed)
    batch = min(SEQUENCES, manifest.limits.max_batch)
    return torch.randint(0, manifest.vocab_size, (batch, length), generator=gen).tolist()


@torch.no_grad()
def teacher_forced_logits(engines: dict[str, Engine], manifest: Manifest, sequences: list[list[int]],
                          device: torch.device) -> torch.Tensor:
    ids = torch.tensor(sequences, device=device)
    B, T = ids.shape
    if manifest.kind != "block":
        engine = engines["decoder"]
        caches = _caches(manifest, "decoder", B, manifest.limits.cache_len, device)
        one = torch.ones(B, dtype=torch.long, device=device)
        out = []
        for t in range(T - 1):
            out.append(engine([ids[:, t:t + 1], one * t, one], caches, attend_len=t + 1).float().cpu())
        return torch.stack(out, dim=1)
    L = manifest.block_len
    blocks = ids.view(B, T // L, L)
    block_caches = _caches(manifest, "block_decoder", B, manifest.limits.cache_len, device)
    one = torch.ones(B, dtype=torch.long, device=device)
    rows = []
    for j in range(T // L - 1):
        prefix = engines["block_decoder"]([blocks[:, j], one * j, one], block_caches, attend_len=j + 1).clone()
        token_caches = _caches(manifest, "token_decoder", B, L + 1, device)
        feed, past, logits = torch.zeros(B, 2, dtype=torch.long, device=device), 0, []
        for k in range(L):
            logits.append(engines["token_decoder"]([feed, prefix, one * past], token_caches,
                                                   attend_len=past + feed.shape[1]).float().cpu())
            past += feed.shape[1]
            feed = blocks[:, j + 1, k:k + 1]
        rows.append(torch.stack(logits, dim=1))
    return torch.stack(rows, dim=1)


def reference_logits(model: torch.nn.Module, sequences: list[list[int]]) -> torch.Tensor:
    """The reference's teacher-forced logits in the layout of `teacher_forced_logits`."""
    with torch.no_grad():
        logits = model(torch.tensor(sequences)).float()
    return logits if model.config.kind == "block" else logits[:, :-1]


def compare_logits(got: torch.Tensor, reference: torch.Tensor) -> Quality:
    got, reference = got.flatten(0, -2).double(), reference.flatten(0, -2).double()
    log_p, log_q = reference.log_softmax(-1), got.log_softmax(-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    agree = got.argmax(-1) == reference.argmax(-1)
    top2 = log_p.topk(2, dim=-1).values
    confident = (top2[:, 0] - top2[:, 1]) >= CONFIDENT_MARGIN
    sure = float(agree[confident].double().mean()) if confident.any() else 1.0
    return Quality(got.shape[0], float(kl.mean()), float(agree.double().mean()), int(confident.sum()), sure,
                   float((got - reference).abs().max()))


def _caches(manifest: Manifest, graph: str, batch: int, length: int, device) -> list[torch.Tensor]:
    from .engine import SPEC_DTYPES

    specs = [t for t in manifest.graphs[graph].inputs if t.name.startswith("past_key_values.")]
    return [torch.zeros([batch, t.shape[1], length, t.shape[3]], dtype=SPEC_DTYPES[t.dtype], device=device)
            for t in specs]
