"""The Block model and the sampler against references that share no code with them: Hugging Face
transformers' GPT-NeoX composed into a Block Transformer by hand (docs/model.md), the softmax
distribution after temperature / top-k / top-p computed independently, and transformers'
`RepetitionPenaltyLogitsProcessor`."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from blockrt.exporter import build_model, get_preset, init_random
from blockrt.generation import GenerationConfig, SamplingState, mark_seen, penalize, sample

transformers = pytest.importorskip("transformers", reason="the independent references need transformers "
                                   "(pip install -e '.[dev]')")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def hf_stack(cfg, state: dict[str, torch.Tensor], prefix: str, with_head: bool):
    """transformers' GPT-NeoX for one of our stacks, loaded with the tensors under `prefix`."""
    hf_config = transformers.GPTNeoXConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, intermediate_size=cfg.intermediate_size, rotary_pct=cfg.rotary_pct,
        rotary_emb_base=cfg.rotary_base, layer_norm_eps=cfg.layer_norm_eps, use_parallel_residual=True,
        hidden_act="gelu", tie_word_embeddings=False, attn_implementation="eager")
    model = (transformers.GPTNeoXForCausalLM if with_head else transformers.GPTNeoXModel)(hf_config)
    ours = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not with_head:  # the block decoder reads block embeddings; its token embedding is never used
        ours["embed_in.weight"] = torch.full((cfg.vocab_size, cfg.hidden_size), float("nan"))
    if with_head and "lm_head.weight" in model.state_dict():  # transformers 5 names the output layer lm_head
        ours["lm_head.weight"] = ours.pop("embed_out.weight")
    model.load_state_dict(ours, strict=True)
    return model.eval()


def hf_block_transformer_logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Teacher-forced logits [B, N-1, L, V] of a Block Transformer, computed from its weights with
    transformers' GPT-NeoX stacks and plain tensor ops only."""
    cfg, state = model.config, model.state_dict()
    L = cfg.block_len
    B, T = input_ids.shape
    N = T // L
    block = hf_stack(cfg.block_decoder, state, "block_decoder.gpt_neox.", with_head=False)
    token = hf_stack(cfg.token_decoder, {k: v for k, v in state.items() if k != "token_decoder.expansion_layer.weight"
                                         and k != "token_decoder.expansion_layer.bias"},
                     "token_decoder.", with_head=True)
    # embedder: L lookups of width h_block / L, concatenated (token 0 first)
    embeds = F.embedding(input_ids, state["embedder.embeddings.weight"]).reshape(B, N, -1)
    context = block(inputs_embeds=embeds, position_ids=torch.arange(N).expand(B, N)).last_hidden_state
    # expansion layer: a 1x1 convolution = a linear map to 2 * h_tok channels, channels [0:h_tok] are prefix 0
    w, b = state["token_decoder.expansion_layer.weight"][:, :, 0], state["token_decoder.expansion_layer.bias"]
    prefix = (context[:, :-1] @ w.T + b).reshape(B, N - 1, 2, -1)
    tokens = F.embedding(input_ids.view(B, N, L)[:, 1:, : L - 1], state["token_decoder.gpt_neox.embed_in.weight"])
    x = torch.cat([prefix, tokens], dim=2).flatten(0, 1)  # [B*(N-1), L+1, h_tok] at local positions 0..L
    logits = token(inputs_embeds=x, position_ids=torch.arange(L + 1).expand(x.shape[0], L + 1)).logits
    return logits[:, 1:].reshape(B, N - 1, L, -1)  # position 1 (prefix 1) predicts token 0 of the block


@pytest.mark.parametrize("preset, seed", [("tiny_block", 1), ("tiny_block_wide", 2)])
def test_block_teacher_forced_logits_equal_transformers_gpt_neox_composed_by_hand(preset, seed):
    model = init_random(build_model(get_preset(preset)), seed=seed).eval()
    L = model.config.block_len
    ids = torch.randint(0, model.config.vocab_size, (2, 9 * L), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ours = model(ids)
        reference = hf_block_transformer_logits(model, ids)
    assert ours.shape == reference.shape == (2, 8, L, model.config.vocab_size)
    assert rel_err(ours, reference) < 1e-5


# ----------------------------------------------------------------------------------- sampling

def expected_distribution(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """softmax(logits / temperature) restricted to the top-k tokens and then to the smallest set of
    most likely tokens whose probability mass reaches top_p, renormalised (float64 numpy)."""
    z = logits.astype(np.float64) / temperature
    order = np.argsort(-z, kind="stable")
    keep = np.zeros_like(z, dtype=bool)
    keep[order[: top_k or len(z)]] = True
    p = np.where(keep, np.exp(z - z.max()), 0.0)
    p /= p.sum()
    sorted_p = p[order]
    before = np.cumsum(sorted_p) - sorted_p  # mass of the more likely tokens
    nucleus = np.zeros_like(keep)
    nucleus[order[before < top_p]] = True
    p = np.where(nucleus & keep, p, 0.0)
    return p / p.sum()


DRAWS = 20000


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.3, 5, 1.0),
                                                       (1.0, 0, 0.6), (0.8, 6, 0.8)])
def test_sampled_tokens_follow_the_softmax_after_temperature_top_k_and_top_p(temperature, top_k, top_p):
    """DRAWS seeded draws (one row per seed) of a 12-token vocabulary. Total-variation bound: for
    n draws over k categories, E[TV] <= sqrt(k / n) / 2 ~= 0.012 here, and by McDiarmid
    P(TV > E[TV] + t) <= exp(-2 n t^2); with t = 0.02 that is exp(-16) ~= 1e-7, so the test fails
    by chance with probability below 1e-6 (its draws are seeded: the outcome is fixed)."""
    vocab = 12
    logits = torch.tensor([2.0, 1.5, 1.4, 1.0, 0.5, 0.3, 0.0, -0.2, -0.5, -1.0, -2.0, -3.0])
    config = GenerationConfig(temperature=temperature, top_k=top_k, top_p=top_p)
    state = SamplingState(DRAWS, vocab, "cpu")
    state.assign(list(range(DRAWS)), [config] * DRAWS, [[0]] * DRAWS, eos_token_id=0)
    state.seed = torch.arange(DRAWS, dtype=torch.int64)  # one independent stream per draw
    tokens = sample(logits.expand(DRAWS, vocab), state, torch.zeros(DRAWS, dtype=torch.long))
    observed = np.bincount(tokens.numpy(), minlength=vocab) / DRAWS
    expected = expected_distribution(logits.numpy(), temperature, top_k, top_p)
    assert observed[expected == 0].sum() == 0, "a token outside top-k / top-p was drawn"
    bound = math.sqrt(vocab / DRAWS) / 2 + 0.02
    assert 0.5 * np.abs(observed - expected).sum() < bound


def test_draws_of_one_stream_at_successive_steps_follow_the_softmax():
    """One seed, DRAWS steps: the stream position alone must decorrelate draws (same bound as above)."""
    vocab = 12
    logits = torch.linspace(1.5, -1.5, vocab)
    state = SamplingState(1, vocab, "cpu")
    state.assign([0], [GenerationConfig(temperature=1.0, seed=123)], [[0]], eos_token_id=0)
    counts = np.zeros(vocab)
    for step in range(0, DRAWS, 1000):  # 1000 steps per call: rows of one state share the seed
        rows = state.rows(torch.zeros(1000, dtype=torch.long))
        tokens = sample(logits.expand(1000, vocab), rows, torch.arange(step, step + 1000))
        counts += np.bincount(tokens.numpy(), minlength=vocab)
    expected = expected_distribution(logits.numpy(), 1.0, 0, 1.0)
    assert 0.5 * np.abs(counts / DRAWS - expected).sum() < math.sqrt(vocab / DRAWS) / 2 + 0.02


@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_repetition_penalty_equals_transformers_repetition_penalty_logits_processor(penalty):
    """Rows with different histories (prompt tokens, then generated ones marked as seen): the
    penalised logits equal transformers' processor on the same history, and greedy sampling
    picks their argmax."""
    vocab, rows = 50, 64
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(rows, vocab, generator=gen) * 2
    prompts = [torch.randint(0, vocab, (int(n),), generator=gen).tolist()
               for n in torch.randint(1, 20, (rows,), generator=gen)]
    generated = torch.randint(0, vocab, (rows,), generator=gen)
    state = SamplingState(rows, vocab, "cpu")
    state.assign(list(range(rows)), [GenerationConfig(repetition_penalty=penalty)] * rows, prompts, eos_token_id=0)
    mark_seen(state, generated)
    processor = transformers.RepetitionPenaltyLogitsProcessor(penalty)
    expected = torch.cat([processor(torch.tensor([p + [int(g)]]), logits[i:i + 1].clone())
                          for i, (p, g) in enumerate(zip(prompts, generated))])
    assert torch.equal(penalize(logits, state), expected)
    assert (expected.argmax(-1) != logits.argmax(-1)).any(), "the penalty must change some greedy choices here"
    assert torch.equal(sample(logits, state, torch.zeros(rows, dtype=torch.long)), expected.argmax(-1))
