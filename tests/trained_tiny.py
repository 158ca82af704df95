"""A tiny Block Transformer trained in seconds on a synthetic corpus, so quantization is measured on
a model whose predictions are sharp (random weights give near-uniform distributions that hide
quantization error).

Corpus (vocabulary 64, sequences of 8 blocks of 4 tokens), two tasks mixed half and half:
- counting: start s, stride d in 1..3: s, s+d, s+2d, ... (mod 60); every token after the first
  block is determined by the tokens before it;
- a successor grammar: a fixed random permutation P of the vocabulary, x[t+1] = P(x[t]) from a
  random start; every token after the first is determined.

`task_accuracy` is the next-token accuracy on exactly the determined positions of held-out
sequences. Run `python tests/trained_tiny.py` for the README's quality table.
"""

from __future__ import annotations

import torch

from blockrt.exporter.config import BlockConfig, NeoXConfig
from blockrt.exporter.model import BlockTransformer, init_random

VOCAB, BLOCKS, L = 64, 8, 4
SUCCESSOR = torch.randperm(VOCAB, generator=torch.Generator().manual_seed(7)).tolist()
CONFIG = BlockConfig(block_decoder=NeoXConfig(num_layers=2, hidden_size=64, vocab_size=VOCAB),
                     token_decoder=NeoXConfig(num_layers=2, hidden_size=64, vocab_size=VOCAB))


def corpus(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [n, BLOCKS * L], determined [n, BLOCKS * L] bool): sequences and the positions whose
    token follows from the ones before."""
    gen = torch.Generator().manual_seed(seed)
    T = BLOCKS * L
    ids = torch.empty(n, T, dtype=torch.long)
    known = torch.zeros(n, T, dtype=torch.bool)
    for i in range(n):
        if i % 2 == 0:
            start, stride = torch.randint(0, 60, (1,), generator=gen).item(), torch.randint(1, 4, (1,), generator=gen).item()
            ids[i] = (start + stride * torch.arange(T)) % 60
            known[i, 2:] = True  # two tokens fix start and stride
        else:
            x = torch.randint(0, VOCAB, (1,), generator=gen).item()
            for t in range(T):
                ids[i, t], x = x, SUCCESSOR[x]
            known[i, 1:] = True
    return ids, known


def train(steps: int = 300, seed: int = 0) -> BlockTransformer:
    """Deterministic training (CPU, one thread, fixed seeds): under 30 s."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: threads only contend (and keep results reproducible)
    try:
        return _train(steps, seed)
    finally:
        torch.set_num_threads(threads)


def _train(steps: int, seed: int) -> BlockTransformer:
    torch.manual_seed(seed)
    model = init_random(BlockTransformer(CONFIG), seed)
    ids, _ = corpus(2048, seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        batch = ids[torch.randint(0, len(ids), (32,), generator=gen)]
        logits = model(batch)  # [B, N-1, L, V] predicts blocks 1..N-1
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, -2), batch[:, L:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


@torch.no_grad()
def task_accuracy(model: torch.nn.Module, n: int = 256, seed: int = 2) -> float:
    """Next-token accuracy on the determined positions of held-out sequences (blocks 1..N-1)."""
    ids, known = corpus(n, seed)
    predicted = model(ids).argmax(-1).flatten(1)  # [n, (N-1) * L]
    mask = known[:, L:]
    return float((predicted == ids[:, L:])[mask].double().mean())


def quality_table(model: torch.nn.Module) -> list[dict]:
    """One row per mode: task accuracy and quality against the unquantized model (eager QDQ
    arithmetic, which `blockrt verify` checks against the exported graphs)."""
    from blockrt.exporter.quantize import calibration_sequences, quantize_model
    from blockrt.runtime.quality import compare_logits

    ids, _ = corpus(256, seed=2)
    with torch.no_grad():
        reference = model(ids)
    calib, _ = calibration_sequences(CONFIG, None)
    rows = [{"mode": "none (fp32)", "accuracy": task_accuracy(model)}]
    for mode in ("int8-wo", "fp8", "int4-wo"):
        qmodel = quantize_model(model, mode, sequences=calib)
        with torch.no_grad():
            q = compare_logits(qmodel(ids), reference)
        rows.append({"mode": mode, "accuracy": task_accuracy(qmodel), "mean_kl": q.mean_kl,
                     "top1_agreement": q.top1_agreement, "max_logit_error": q.max_logit_error})
    return rows


if __name__ == "__main__":
    import time

    start = time.perf_counter()
    trained = train()
    print(f"trained in {time.perf_counter() - start:.1f} s")
    print("| quantization | task accuracy | mean KL vs fp32 | top-1 agreement | max logit error |")
    print("|---|---|---|---|---|")
    for r in quality_table(trained):
        extra = (f"{r['mean_kl']:.1e} | {r['top1_agreement']:.2%} | {r['max_logit_error']:.3f}" if "mean_kl" in r
                 else "- | - | -")
        print(f"| {r['mode']} | {r['accuracy']:.2%} | {extra} |")
