"""The PyTorch reference: equal to Hugging Face GPT-NeoX, and the reference generate's semantics."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from blockrt.exporter import build_model, get_preset, init_random
from blockrt.exporter.checkpoint import load_checkpoint, save_checkpoint
from blockrt.exporter.config import NeoXConfig, VanillaConfig
from blockrt.exporter.generate import generate, pad_to_block
from blockrt.generation import GenerationConfig



def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def random_model(preset: str, seed: int = 0):
    return init_random(build_model(get_preset(preset)), seed=seed).eval()


@pytest.fixture(scope="module")
def block_model():
    return random_model("tiny_block", seed=1)


@pytest.fixture(scope="module")
def wide_block_model():
    return random_model("tiny_block_wide", seed=2)


@pytest.fixture(scope="module")
def vanilla_model():
    return random_model("tiny_vanilla", seed=3)


# ------------------------------------------------------------------------ Hugging Face equality

@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers", reason="the comparison with Hugging Face GPT-NeoX needs "
                               "transformers (pip install -e '.[dev]')")


VANILLA_SHAPES = {
    "tiny_vanilla": get_preset("tiny_vanilla"),
    "2x128_4heads": VanillaConfig(decoder=NeoXConfig(num_layers=2, hidden_size=128, vocab_size=1000, num_heads=4)),
}


@pytest.mark.parametrize("name", VANILLA_SHAPES)
def test_vanilla_logits_equal_transformers_gpt_neox_loaded_from_our_checkpoint(name, tmp_path, transformers):
    ours = init_random(build_model(VANILLA_SHAPES[name]), seed=5).eval()
    save_checkpoint(ours, tmp_path)
    hf = transformers.GPTNeoXForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    ids = torch.randint(0, ours.config.vocab_size, (2, 37), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert rel_err(ours(ids), hf(ids).logits) < 1e-5


def test_pythia_checkpoint_written_by_transformers_loads_with_identical_logits(tmp_path, transformers):
    # 2 heads of 64 at width 128 is not what the head-size rule gives: config.json must be read
    hf_config = transformers.GPTNeoXConfig(hidden_size=128, num_hidden_layers=3, num_attention_heads=2,
                                           intermediate_size=512, vocab_size=300, rotary_pct=0.25,
                                           use_parallel_residual=True, attn_implementation="sdpa")
    torch.manual_seed(0)
    hf = transformers.GPTNeoXForCausalLM(hf_config).eval()
    with torch.no_grad():  # HF initialises LayerNorms to exactly 1 and 0; make them matter
        for name, p in hf.named_parameters():
            if "layernorm" in name or "layer_norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    hf.save_pretrained(tmp_path, safe_serialization=True)
    ours = load_checkpoint(tmp_path)
    assert ours.config.decoder.num_heads == 2 and ours.config.decoder.num_layers == 3
    ids = torch.randint(0, 300, (2, 21), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert rel_err(ours(ids), hf(ids).logits) < 1e-5


# ------------------------------------------------------------------ block model and generation

def teacher_forced_logits(model, prompt: list[int], generated: list[int]) -> torch.Tensor:
    """Logits [len(generated), V] of each generated token, from one teacher-forced forward."""
    L, pad = model.config.block_len, model.config.pad_token_id
    padded = pad_to_block(prompt, L, pad)
    seq = padded + generated
    seq = seq + [pad] * (-len(seq) % L)  # complete the last block; causal, so unseen by the rows we read
    logits = model(torch.tensor([seq]))[0]  # [N-1, L, V]
    first = len(padded) // L  # block index of the first generated token
    return torch.stack([logits[first + i // L - 1, i % L] for i in range(len(generated))])


@pytest.mark.parametrize("prompt_len", [4, 8, 5, 7, 1])
@pytest.mark.parametrize("model_name", ["block_model", "wide_block_model"])
def test_block_teacher_forced_logits_equal_logits_met_along_cached_generate(model_name, prompt_len, request):
    model = request.getfixturevalue(model_name)
    prompt = list(range(3, 3 + prompt_len))
    out = generate(model, [prompt], GenerationConfig(max_new_tokens=11, ignore_eos=True), record_logits=True)
    assert len(out.tokens[0]) == 11
    with torch.no_grad():
        expected = teacher_forced_logits(model, prompt, out.tokens[0])
    assert rel_err(torch.stack(out.logits[0]), expected) < 1e-5


def test_vanilla_logits_along_cached_generate_equal_the_full_forward(vanilla_model):
    prompt = [5, 6, 7]
    out = generate(vanilla_model, [prompt], GenerationConfig(max_new_tokens=9, ignore_eos=True), record_logits=True)
    with torch.no_grad():
        full = vanilla_model(torch.tensor([prompt + out.tokens[0]]))[0, len(prompt) - 1: -1]
    assert rel_err(torch.stack(out.logits[0]), full) < 1e-5


RAGGED = [[1, 2, 3, 4], [5, 6, 7, 8, 9], [10, 11, 12, 13, 14, 15, 16, 17], [18], [19, 20, 21, 22, 23, 24, 25]]


@pytest.mark.parametrize("model_name", ["block_model", "wide_block_model", "vanilla_model"])
@pytest.mark.parametrize("sampling", [dict(), dict(temperature=0.9, top_k=20, top_p=0.9, seed=4)], ids=["greedy", "sampled"])
def test_cached_generation_equals_recompute_generation(model_name, sampling, request):
    model = request.getfixturevalue(model_name)
    config = GenerationConfig(max_new_tokens=10, ignore_eos=True, **sampling)
    cached = generate(model, RAGGED, config)
    assert cached.tokens == generate(model, RAGGED, config, use_cache=False).tokens
    assert all(len(t) == 10 for t in cached.tokens)


@pytest.mark.parametrize("model_name", ["block_model", "vanilla_model"])
def test_ragged_batch_gives_each_prompt_what_it_gets_alone(model_name, request):
    model = request.getfixturevalue(model_name)
    config = GenerationConfig(max_new_tokens=9, ignore_eos=True)
    batched = generate(model, RAGGED, config).tokens
    assert batched == [generate(model, [p], config).tokens[0] for p in RAGGED]


def test_seeded_sampling_is_reproducible_and_the_seed_matters(block_model):
    def run(seed):
        return generate(block_model, RAGGED, GenerationConfig(max_new_tokens=12, temperature=1.0, seed=seed,
                                                               ignore_eos=True)).tokens

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_top_k_1_sampling_equals_greedy(block_model):
    greedy = generate(block_model, RAGGED, GenerationConfig(max_new_tokens=10, ignore_eos=True)).tokens
    top1 = generate(block_model, RAGGED, GenerationConfig(max_new_tokens=10, temperature=1.5, top_k=1, seed=3,
                                                           ignore_eos=True)).tokens
    assert top1 == greedy


def test_tokens_sampled_with_top_k_5_are_among_the_5_largest_logits(block_model):
    config = GenerationConfig(max_new_tokens=16, temperature=2.0, top_k=5, seed=1, ignore_eos=True)
    out = generate(block_model, RAGGED, config, record_logits=True)
    for tokens, logits in zip(out.tokens, out.logits):
        for token, row in zip(tokens, logits):
            assert token in row.topk(5).indices.tolist()
    assert out.tokens != generate(block_model, RAGGED, dataclasses.replace(config, temperature=0.0)).tokens


def test_tokens_sampled_with_top_p_lie_in_the_nucleus(block_model):
    config = GenerationConfig(max_new_tokens=16, temperature=1.0, top_p=0.3, seed=2, ignore_eos=True)
    out = generate(block_model, RAGGED, config, record_logits=True)
    for tokens, logits in zip(out.tokens, out.logits):
        for token, row in zip(tokens, logits):
            probs, order = row.softmax(-1).sort(descending=True)
            nucleus = order[(probs.cumsum(-1) - probs) < config.top_p].tolist()
            assert token in nucleus


def test_stop_token_ends_the_sequence_with_finish_reason_stop(block_model):
    prompt = [[3, 4, 5]]
    free = generate(block_model, prompt, GenerationConfig(max_new_tokens=12, ignore_eos=True)).tokens[0]
    stop = free[5]
    first = free.index(stop)
    out = generate(block_model, prompt, GenerationConfig(max_new_tokens=12, stop_token_ids=[stop], ignore_eos=True))
    assert out.tokens[0] == free[: first + 1]
    assert out.finish_reasons == ["stop"]


def test_eos_stops_unless_ignore_eos(block_model):
    prompt = [[3, 4, 5]]
    free = generate(block_model, prompt, GenerationConfig(max_new_tokens=12, ignore_eos=True)).tokens[0]
    model = random_model("tiny_block", seed=1)
    model.config = dataclasses.replace(model.config, eos_token_id=free[6])
    first = free.index(free[6])
    out = generate(model, prompt, GenerationConfig(max_new_tokens=12))
    assert out.tokens[0] == free[: first + 1] and out.finish_reasons == ["stop"]
    ignored = generate(model, prompt, GenerationConfig(max_new_tokens=12, ignore_eos=True))
    assert ignored.tokens[0] == free and ignored.finish_reasons == ["length"]


def test_one_row_stopping_early_leaves_the_other_rows_unchanged(block_model):
    free = generate(block_model, RAGGED, GenerationConfig(max_new_tokens=12, ignore_eos=True)).tokens
    stop = free[0][2]
    out = generate(block_model, RAGGED, GenerationConfig(max_new_tokens=12, stop_token_ids=[stop], ignore_eos=True))
    for tokens, reference, reason in zip(out.tokens, free, out.finish_reasons):
        expected = reference[: reference.index(stop) + 1] if stop in reference else reference
        assert tokens == expected
        assert reason == ("stop" if stop in reference else "length")


@pytest.mark.parametrize("max_new", [1, 3, 7, 9])
def test_max_new_tokens_not_a_multiple_of_the_block_length(block_model, max_new):
    out = generate(block_model, RAGGED, GenerationConfig(max_new_tokens=max_new, ignore_eos=True))
    assert [len(t) for t in out.tokens] == [max_new] * len(RAGGED)
    assert out.finish_reasons == ["length"] * len(RAGGED)
    longer = generate(block_model, RAGGED, GenerationConfig(max_new_tokens=12, ignore_eos=True))
    assert out.tokens == [t[:max_new] for t in longer.tokens]


def test_prompt_shorter_than_a_block_is_left_padded_with_the_pad_id(block_model):
    config = GenerationConfig(max_new_tokens=6, ignore_eos=True)
    short = generate(block_model, [[9, 10]], config).tokens
    assert short == generate(block_model, [[0, 0, 9, 10]], config).tokens
    model = random_model("tiny_block", seed=1)
    model.config = dataclasses.replace(model.config, pad_token_id=7)
    assert generate(model, [[9, 10]], config).tokens == generate(model, [[7, 7, 9, 10]], config).tokens


def test_prompts_with_ids_outside_the_vocabulary_are_rejected(block_model):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        generate(block_model, [[1, 512]], GenerationConfig(max_new_tokens=2))
