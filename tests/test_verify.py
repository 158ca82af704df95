"""Verification of exported artifacts against the fp32 PyTorch reference: per-step errors on ONNX
Runtime, greedy tokens through the runtime, skipped backends with reasons, and failures that are
reported (exit code 1) or refused (corrupt artifacts)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from blockrt.errors import UserError
from blockrt.exporter import TINY_PRESETS
from blockrt.graphs.manifest import ArtifactError, Manifest, sha256_file
from blockrt.runtime.verify import DEFAULT_PROMPT_LENGTHS, verify

from conftest import TEST_MAX_BATCH


@pytest.mark.parametrize("cache_io", ["inplace", "concat"])
@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_onnxruntime_matches_the_fp32_reference_step_by_step_and_for_128_greedy_tokens(exported, preset, cache_io):
    report = verify(exported(preset, cache_io), backends=("onnxruntime",), gen_tokens=128)
    assert report.passed, report.format_table()
    steps = [c for c in report.checks if c.rel is not None]
    if preset == "tiny_vanilla":
        stages, outputs = {"decoder prefill", "decoder decode"}, {"logits"}
    else:
        stages = {"block_decoder prefill", "token_decoder steps", "block_decoder decode"}
        outputs = {"prefix_embeds", "logits"}
    assert {c.stage for c in steps} == stages
    assert {c.output for c in steps if not c.output.startswith("present.*")} == outputs
    assert {c.stage for c in steps if c.output.startswith("present.*")} == stages  # caches compared too
    assert all(c.rel < 1e-4 and c.limit == 1e-4 and c.backend == "onnxruntime" for c in steps)
    (gen,) = [c for c in report.checks if c.stage.startswith("generate")]
    assert gen.passed and gen.required
    assert gen.detail == f"{128 * len(DEFAULT_PROMPT_LENGTHS)} tokens identical"
    assert len(DEFAULT_PROMPT_LENGTHS) > TEST_MAX_BATCH  # rows join as others finish: ragged, batched
    assert any(n % 4 for n in DEFAULT_PROMPT_LENGTHS) and len(set(DEFAULT_PROMPT_LENGTHS)) > 1


def test_fp16_export_runs_on_onnxruntime_within_fp16_limits_with_identical_tokens(exported):
    report = verify(exported("tiny_block", "inplace", "fp16"), gen_tokens=128)
    assert report.passed, report.format_table()
    steps = [c for c in report.checks if c.rel is not None]
    assert all(c.limit == 2e-2 and c.rel < 2e-2 for c in steps)
    assert any(c.rel > 1e-5 for c in steps)  # really computed in half precision


def test_bf16_export_is_skipped_on_onnxruntime_cpu_with_the_reason_and_does_not_pass(exported):
    report = verify(exported("tiny_block", "inplace", "bf16"))
    assert all(c.backend == "files" and c.passed for c in report.checks) and not report.passed
    assert "no bf16 MatMul kernel" in report.skipped["onnxruntime"]
    assert report.format_table().endswith("FAILED: no backend could be checked")


def test_tensorrt_is_skipped_with_a_reason_when_no_engine_can_run_here(exported):
    report = verify(exported("tiny_vanilla"), backends=("onnxruntime", "tensorrt"), gen_tokens=4)
    assert report.passed
    assert "blockrt build" in report.skipped["tensorrt"]
    assert "tensorrt: skipped: the artifact has no TensorRT engines" in report.format_table()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the skip reason on a machine without a GPU")
def test_built_engines_are_skipped_without_a_gpu(artifact_copy):
    pytest.importorskip("tensorrt_rtx_bindings", reason="TensorRT-RTX is not installed: no engines to build")
    from blockrt.runtime.build import build_engines

    directory = artifact_copy("tiny_vanilla")
    build_engines(directory, backend="tensorrt-rtx")
    report = verify(directory, backends=("tensorrt",), gen_tokens=4)
    assert "NVIDIA GPU" in report.skipped["tensorrt"] and not report.passed


def _perturb_reference(directory, scale: float) -> None:
    """Change the weights the reference is rebuilt from, as if the graphs had been exported wrong."""
    path = directory / "weights.safetensors"
    tensors = load_file(path)
    name = next(k for k in tensors if k.endswith("dense_h_to_4h.weight"))
    tensors[name] = tensors[name] * scale
    save_file(tensors, path)
    manifest = Manifest.load(directory, verify_hashes=False)
    manifest.assets["weights"].sha256 = sha256_file(path)
    manifest.save(directory)


def test_graphs_that_compute_something_else_fail_verification(artifact_copy, blockrt_cli):
    directory = artifact_copy("tiny_block")
    _perturb_reference(directory, 1.001)  # a small error: within fp16 limits, far outside fp32 ones
    report = verify(directory, gen_tokens=16)
    assert not report.passed
    failed = [c for c in report.checks if not c.passed]
    assert failed and all(c.rel is None or c.rel > 1e-4 for c in failed)
    code, out, err = blockrt_cli("verify", str(directory), "--gen-tokens", "16")
    assert code == 1 and "FAIL" in out and out.rstrip().endswith("FAILED")


def test_differing_tokens_are_reported_with_the_first_differing_position(artifact_copy):
    directory = artifact_copy("tiny_vanilla")
    _perturb_reference(directory, 3.0)
    report = verify(directory, gen_tokens=32)
    (gen,) = [c for c in report.checks if c.stage.startswith("generate")]
    assert not gen.passed and "differs from token" in gen.detail


def test_cli_verify_prints_a_json_report_and_exits_0_when_it_passes(exported, blockrt_cli):
    code, out, err = blockrt_cli("verify", str(exported("tiny_block", "concat")), "--gen-tokens", "8", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["passed"] and report["cache_io"] == "concat"
    assert {c["stage"] for c in report["checks"]} >= {"block_decoder prefill", "token_decoder steps"}


def test_generation_is_shortened_to_fit_the_context_with_a_note(exported):
    report = verify(exported("tiny_vanilla"), prompts=[[1, 2, 3], [4] * 150], gen_tokens=128)
    assert report.passed
    assert report.notes == ["generating 10 tokens instead of 128: the longest prompt (150 tokens padded) and the "
                            "artifact's max context 160 leave no more"]


@pytest.mark.parametrize("kwargs, message", [
    ({"prompts": [[1] * 160]}, "leaves no room to generate"),
    ({"prompts": [[1, 99999]]}, "outside the vocabulary"),
    ({"backends": ("tensorflow",)}, "unknown backend"),
    ({"gen_tokens": 0}, "gen_tokens must be an integer >= 1"),
])
def test_bad_verify_arguments_are_user_errors(exported, kwargs, message):
    with pytest.raises(UserError, match=message):
        verify(exported("tiny_vanilla"), **kwargs)


def test_artifact_with_a_changed_file_fails_on_its_file_check_before_anything_runs(artifact_copy, blockrt_cli):
    directory = artifact_copy("tiny_block")
    data = bytearray((directory / "token_decoder.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (directory / "token_decoder.onnx").write_bytes(bytes(data))
    report = verify(directory)
    assert not report.passed and all(c.backend == "files" for c in report.checks)
    (bad,) = [c for c in report.checks if not c.passed]
    assert bad.output == "token_decoder.onnx" and "re-export" in bad.detail
    code, out, err = blockrt_cli("verify", str(directory))
    assert code == 1, err
    row = next(line for line in out.splitlines() if "token_decoder.onnx" in line)
    assert "FAIL" in row and "graphs not run" in out and out.rstrip().endswith("FAILED") and "Traceback" not in err


def test_truncated_graph_with_a_matching_hash_is_an_artifact_error(artifact_copy):
    directory = artifact_copy("tiny_vanilla")
    path = directory / "decoder.onnx"
    path.write_bytes(path.read_bytes()[:5000])
    manifest = Manifest.load(directory, verify_hashes=False)
    manifest.graphs["decoder"].file.sha256 = sha256_file(path)
    manifest.save(directory)
    with pytest.raises(ArtifactError, match="decoder.onnx"):
        verify(directory)


def test_artifact_without_saved_weights_asks_for_the_checkpoint(artifact_copy, tmp_path):
    from blockrt.exporter.checkpoint import load_checkpoint, save_checkpoint

    directory = artifact_copy("tiny_block")
    manifest = Manifest.load(directory)
    model = load_checkpoint(directory / "weights.safetensors", config=manifest.model_config)
    ckpt = save_checkpoint(model, tmp_path / "ckpt")
    (directory / "weights.safetensors").unlink()
    del manifest.assets["weights"]
    manifest.save(directory)
    with pytest.raises(ArtifactError, match="no weights.safetensors .* pass the checkpoint"):
        verify(directory)
    assert verify(directory, checkpoint=ckpt, gen_tokens=8).passed
