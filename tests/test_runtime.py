"""The runtime (`blockrt.runtime.Model`) on the CPU: ONNX Runtime and PyTorch engines against the
PyTorch reference `generate`, on exported tiny artifacts."""

from __future__ import annotations

import json

import pytest
import torch

from blockrt.errors import UserError
from blockrt.exporter.checkpoint import load_checkpoint
from blockrt.exporter.generate import generate
from blockrt.generation import GenerationConfig
from blockrt.graphs.manifest import Manifest
from blockrt.runtime import Model

UNALIGNED = [[5, 6, 7, 8, 9]]  # 5 tokens: not a multiple of the block length
RAGGED = [[3], list(range(1, 9)), list(range(20, 33))]  # 1, 8 and 13 tokens in one batch
GREEDY_128 = GenerationConfig(max_new_tokens=128, ignore_eos=True)
SAMPLED = GenerationConfig(max_new_tokens=40, temperature=0.9, top_k=50, top_p=0.9, seed=7, ignore_eos=True)


def reference_model(artifact):
    manifest = Manifest.load(artifact)
    return load_checkpoint(artifact / "weights.safetensors", config=manifest.model_config).eval()


def reference_tokens(artifact, prompts, config):
    return generate(reference_model(artifact), prompts, config).tokens


@pytest.mark.parametrize("backend,cache_io", [("onnxruntime", "inplace"), ("onnxruntime", "concat"), ("torch", "inplace")])
@pytest.mark.parametrize("preset", ["tiny_block", "tiny_vanilla"])
def test_greedy_tokens_equal_the_reference_for_128_tokens_alone_and_in_ragged_batches(exported, preset, backend, cache_io):
    artifact = exported(preset, cache_io)
    model = Model.load(artifact, backend=backend)
    for prompts in (UNALIGNED, RAGGED):
        got = [r.token_ids for r in model.generate(prompts, GREEDY_128)]
        assert got == reference_tokens(artifact, prompts, GREEDY_128)
        assert all(len(t) == 128 for t in got)


def test_wide_block_model_with_different_widths_matches_the_reference(exported):
    artifact = exported("tiny_block_wide")
    got = [r.token_ids for r in Model.load(artifact, backend="onnxruntime").generate(RAGGED, GREEDY_128)]
    assert got == reference_tokens(artifact, RAGGED, GREEDY_128)


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_seeded_sampling_is_reproducible_and_equals_the_reference_draws(exported, backend):
    artifact = exported("tiny_block")
    model = Model.load(artifact, backend=backend)
    first = [r.token_ids for r in model.generate(RAGGED, SAMPLED)]
    again = [r.token_ids for r in model.generate(RAGGED, SAMPLED)]
    other = [r.token_ids for r in model.generate(RAGGED, GenerationConfig(**{**SAMPLED.__dict__, "seed": 8}))]
    assert first == again
    assert first != other
    assert first == reference_tokens(artifact, RAGGED, SAMPLED)


@pytest.mark.parametrize("preset", ["tiny_block", "tiny_vanilla"])
def test_stream_yields_exactly_the_tokens_of_generate(exported, preset):
    model = Model.load(exported(preset), backend="onnxruntime")
    config = GenerationConfig(max_new_tokens=37, ignore_eos=True)
    expected = [r.token_ids for r in model.generate(RAGGED, config)]
    streamed = [[] for _ in RAGGED]
    finished = []
    for chunk in model.stream(RAGGED, config):
        assert chunk.token_ids or chunk.finished
        streamed[chunk.index] += chunk.token_ids
        if chunk.finished:
            finished.append(chunk.index)
    assert streamed == expected
    assert sorted(finished) == [0, 1, 2]


def test_more_prompts_than_rows_queue_and_each_gets_its_own_tokens(exported):
    artifact = exported("tiny_block")
    model = Model.load(artifact, backend="torch", max_batch=2)
    prompts = [[i + 1] * (i % 6 + 1) for i in range(7)]
    config = GenerationConfig(max_new_tokens=24 + 0, ignore_eos=True)
    assert [r.token_ids for r in model.generate(prompts, config)] == reference_tokens(artifact, prompts, config)


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_sequences_that_stop_early_leave_the_batch_without_disturbing_the_others(exported, backend):
    artifact = exported("tiny_block")
    free = reference_tokens(artifact, RAGGED, GenerationConfig(max_new_tokens=30, ignore_eos=True))
    stop = free[1][5]  # the second prompt stops at its 6th token; the others run on (or stop where they meet it)
    config = GenerationConfig(max_new_tokens=30, stop_token_ids=[stop], ignore_eos=True)
    results = Model.load(artifact, backend=backend).generate(RAGGED, config)
    expected = reference_tokens(artifact, RAGGED, config)
    assert [r.token_ids for r in results] == expected
    assert results[1].finish_reason == "stop" and results[1].token_ids[-1] == stop
    assert len(results[1].token_ids) <= 6


def test_max_new_tokens_that_is_not_a_multiple_of_the_block_length_is_exact(exported):
    model = Model.load(exported("tiny_block"), backend="onnxruntime")
    for n in (1, 2, 5, 7):
        out = model.generate(RAGGED, GenerationConfig(max_new_tokens=n, ignore_eos=True))
        assert [len(r.token_ids) for r in out] == [n] * len(RAGGED)
        assert all(r.finish_reason == "length" for r in out)


@pytest.mark.parametrize("prompts,config,message", [
    ([[]], GenerationConfig(), "empty prompt"),
    ([[1, 2, 512]], GenerationConfig(), "outside the vocabulary"),
    ([[1, -1]], GenerationConfig(), "outside the vocabulary"),
    ([list(range(1, 150))], GenerationConfig(max_new_tokens=32), "exceeds the artifact's max context of 160"),
    ([[1, 2]], GenerationConfig(temperature=-1.0), "temperature must be >= 0"),
    ([[1, 2]], GenerationConfig(top_p=0.0), "top_p must be in (0, 1]"),
    ([[1, 2]], GenerationConfig(top_k=-3), "top_k must be an integer >= 0"),
    ([[1, 2]], GenerationConfig(max_new_tokens=0), "max_new_tokens must be an integer >= 1"),
    ([[1, 2]], GenerationConfig(stop_token_ids=[9999]), "outside the vocabulary"),
    ([], GenerationConfig(), "no prompts given"),
])
def test_bad_input_is_a_clear_error_and_the_model_stays_usable(exported, prompts, config, message):
    artifact = exported("tiny_block")
    model = Model.load(artifact, backend="onnxruntime")
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        model.generate([[4, 5, 6]] + prompts if prompts else prompts, config)
    good = GenerationConfig(max_new_tokens=12, ignore_eos=True)
    assert [r.token_ids for r in model.generate(RAGGED, good)] == reference_tokens(artifact, RAGGED, good)


def test_batch_above_the_artifact_limit_is_refused_with_how_to_fix(exported):
    with pytest.raises(UserError, match="above the artifact's limit of 4.*--max-batch 5"):
        Model.load(exported("tiny_block"), backend="onnxruntime", max_batch=5)


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="unknown backend 'tensorflow'"):
        Model.load(".", backend="tensorflow")


def test_tensorrt_backend_without_engines_says_how_to_build_them(exported):
    with pytest.raises(UserError, match="blockrt build"):
        Model.load(exported("tiny_block"), backend="tensorrt")


def test_tensorrt_engines_run_on_a_gpu(exported, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("TensorRT engines need an NVIDIA GPU; none is present here (engine builds are tested in test_build.py)")
    pytest.importorskip("tensorrt", reason="full TensorRT is not installed (pip install 'blockrt[trt]')")
    from blockrt.runtime.build import build_engines

    artifact = tmp_path / "a"
    import shutil

    shutil.copytree(exported("tiny_block"), artifact)
    build_engines(artifact, backend="tensorrt")
    got = [r.token_ids for r in Model.load(artifact, backend="tensorrt").generate(RAGGED, GREEDY_128)]
    assert got == reference_tokens(artifact, RAGGED, GREEDY_128)


def test_cli_run_prints_json_equal_to_the_reference(exported, blockrt_cli):
    artifact = exported("tiny_vanilla")
    code, out, err = blockrt_cli("run", str(artifact), "--prompt-ids", "1,2,3", "--prompt-ids", "9",
                                 "--max-new-tokens", "20", "--ignore-eos", "--json")
    assert code == 0, err
    rows = json.loads(out)
    config = GenerationConfig(max_new_tokens=20, ignore_eos=True)
    assert [r["token_ids"] for r in rows] == reference_tokens(artifact, [[1, 2, 3], [9]], config)
    assert [r["finish_reason"] for r in rows] == ["length", "length"]


def test_cli_run_streams_tokens_and_reads_a_jsonl_prompts_file(exported, blockrt_cli, tmp_path):
    artifact = exported("tiny_block")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('[1, 2, 3]\n{"prompt_ids": [7, 8]}\n')
    code, out, err = blockrt_cli("run", str(artifact), "--prompts-file", str(prompts), "--max-new-tokens", "8",
                                 "--ignore-eos", "--backend", "torch")
    assert code == 0, err
    expected = reference_tokens(artifact, [[1, 2, 3], [7, 8]], GenerationConfig(max_new_tokens=8, ignore_eos=True))
    for i, tokens in enumerate(expected):
        streamed = [int(t) for line in out.splitlines() if line.startswith(f"[{i}] ")
                    for t in line.split()[1:] if t.isdigit()]
        assert streamed == tokens


def test_cli_run_bad_prompt_ids_exit_2_with_the_flag_named(exported, blockrt_cli):
    code, _, err = blockrt_cli("run", str(exported("tiny_block")), "--prompt-ids", "1,x")
    assert code == 2
    assert "--prompt-ids" in err and "'x' is not an integer" in err


@pytest.mark.parametrize("preset", ["tiny_block", "tiny_vanilla"])
def test_bf16_torch_engine_tokens_are_top_choices_of_the_fp32_reference(preset):
    from bf16_check import assert_bf16_tokens_are_reference_top_choices

    assert_bf16_tokens_are_reference_top_choices(preset, "cpu")
