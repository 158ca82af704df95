"""ONNX export and graph checks: contract I/O, dynamic axes, allowed ops, external data, atomic
artifacts, and clear errors for bad options, bad files and bad output directories."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import onnx
import pytest
import torch
from onnx import TensorProto, helper

from blockrt.errors import UserError
from blockrt.exporter import TINY_PRESETS, build_model, get_preset, init_random
from blockrt.exporter.config import config_from_dict
from blockrt.exporter.export import export
from blockrt.graphs.checks import check_artifact, check_graph
from blockrt.graphs.contract import graph_io, graph_names
from blockrt.graphs.manifest import ArtifactError, Manifest, sha256_file

from conftest import TEST_MAX_CONTEXT

export_module = sys.modules["blockrt.exporter.export"]  # `blockrt.exporter.export` is also the function


def _ops(path: Path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node}


@pytest.mark.parametrize("cache_io", ["inplace", "concat"])
@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_every_tiny_preset_exports_graphs_with_exactly_the_contract_io(exported, preset, cache_io):
    directory = exported(preset, cache_io)
    manifest = check_artifact(directory)  # hashes, ONNX checker, shape inference, ops, I/O vs manifest
    cfg = get_preset(preset)
    assert manifest.model_config == cfg
    assert list(manifest.graphs) == list(graph_names(cfg.kind))
    assert (manifest.opset, manifest.cache_io, manifest.dtype) == (24, cache_io, "fp32")
    L = cfg.block_len
    cache_len = -(-TEST_MAX_CONTEXT // L) if cfg.kind == "block" else TEST_MAX_CONTEXT
    assert manifest.limits.cache_len == cache_len
    for name, entry in manifest.graphs.items():
        inputs, outputs = graph_io(cfg, name, cache_io, "fp32", cache_len)
        assert (entry.inputs, entry.outputs) == (inputs, outputs)
        model = check_graph(directory / entry.file.path, entry)
        assert [v.name for v in model.graph.input] == [t.name for t in inputs]
        ops = _ops(directory / entry.file.path)
        assert "Attention" in ops and "If" not in ops
        assert ("TensorScatter" in ops) == (cache_io == "inplace")


def test_dynamic_axes_carry_the_contract_names_in_the_onnx_graph(exported):
    graph = onnx.load(str(exported("tiny_block", "concat") / "block_decoder.onnx")).graph
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in list(graph.input) + list(graph.output)}
    assert dims["input_ids"] == ["batch", "new_tokens"]
    assert dims["past_key_values.0.key"] == ["batch", 2, "past", 32]
    assert dims["attention_mask"] == ["batch", "total"]
    assert dims["present.1.value"] == ["batch", 2, "total", 32]


def test_artifact_holds_weights_that_rebuild_the_exported_model(exported):
    from blockrt.exporter.checkpoint import load_checkpoint

    directory = exported("tiny_block")
    manifest = Manifest.load(directory)
    assert manifest.assets["weights"].sha256 == sha256_file(directory / "weights.safetensors")
    model = load_checkpoint(directory / "weights.safetensors", config=manifest.model_config)
    expected = init_random(build_model(get_preset("tiny_block")), seed=0).state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())
    assert "seed 0" in manifest.source


def test_fp16_and_bf16_exports_pass_the_graph_checks(exported):
    for dtype, onnx_type in (("fp16", "float16"), ("bf16", "bfloat16")):
        manifest = check_artifact(exported("tiny_block", "inplace", dtype))
        entry = manifest.graphs["block_decoder"]
        assert manifest.dtype == dtype
        assert entry.outputs[0].dtype == onnx_type and entry.input("past_key_values.0.key").dtype == onnx_type
        assert manifest.graphs["token_decoder"].outputs[0].dtype == "float32"  # logits stay fp32


def test_graphs_over_the_size_threshold_keep_weights_in_hashed_external_data(tmp_path, monkeypatch):
    from blockrt.runtime.verify import verify

    monkeypatch.setattr(export_module, "EXTERNAL_DATA_THRESHOLD", 1024)
    manifest = export("tiny_vanilla", tmp_path / "art", max_batch=2, max_context=32)
    entry = manifest.graphs["decoder"]
    assert [e.path for e in entry.external_data] == ["decoder.onnx.data"]
    data = tmp_path / "art" / "decoder.onnx.data"
    assert entry.external_data[0].sha256 == sha256_file(data)
    assert data.stat().st_size > (tmp_path / "art" / "decoder.onnx").stat().st_size
    check_artifact(tmp_path / "art")
    report = verify(tmp_path / "art", gen_tokens=8)  # ONNX Runtime loads the external weights
    assert report.passed, report.format_table()

    data.write_bytes(data.read_bytes()[:-100])
    with pytest.raises(ArtifactError, match="decoder.onnx.data"):
        Manifest.load(tmp_path / "art")


def test_tokenizer_is_copied_into_the_artifact_with_its_hash(tmp_path, bpe_tokenizer_file):
    tok = bpe_tokenizer_file
    manifest = export("tiny_vanilla", tmp_path / "art", max_batch=1, max_context=8, tokenizer=tok)
    assert manifest.tokenizer == "tokenizer.json"
    assert (tmp_path / "art" / "tokenizer.json").read_bytes() == tok.read_bytes()
    assert manifest.assets["tokenizer"].sha256 == sha256_file(tok)
    with pytest.raises(UserError, match="--tokenizer .*missing.json"):
        export("tiny_vanilla", tmp_path / "art2", tokenizer=tmp_path / "missing.json")


def _word_tokenizer(path, size: int):
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({f"w{i}": i for i in range(size)}, unk_token="w0")).save(str(path))
    return path


def test_tokenizer_larger_than_the_models_vocabulary_is_refused_with_the_count(tmp_path):
    tok = _word_tokenizer(tmp_path / "tokenizer.json", 600)  # tiny presets have 512 ids
    with pytest.raises(UserError, match=r"has 600 tokens, but the model's vocabulary has 512: ids 512..599 \(88 tokens\)"):
        export("tiny_vanilla", tmp_path / "art", max_batch=1, max_context=8, tokenizer=tok)
    assert not (tmp_path / "art").exists()


def test_a_tokenizer_json_that_tokenizers_cannot_load_is_refused_at_export(tmp_path):
    bad = tmp_path / "tokenizer.json"
    bad.write_text(json.dumps({"version": "1.0", "model": {"type": "BPE"}}))  # no vocab, no merges
    with pytest.raises(UserError, match=f"--tokenizer {bad}: not a readable Hugging Face tokenizer.json"):
        export("tiny_vanilla", tmp_path / "art", max_batch=1, max_context=8, tokenizer=bad)
    assert not (tmp_path / "art").exists()


def test_exporting_in_another_dtype_leaves_the_callers_model_unchanged(tmp_path):
    model = init_random(build_model(get_preset("tiny_vanilla")), seed=3)
    manifest = export(model, tmp_path / "art", dtype="fp16", max_batch=2, max_context=16, source="my model")
    assert next(model.parameters()).dtype == torch.float32
    assert manifest.source == "my model" and manifest.dtype == "fp16"


@pytest.mark.parametrize("kwargs, message", [
    ({"dtype": "int8"}, "unknown dtype 'int8'"),
    ({"cache_io": "paged"}, "unknown cache I/O mode 'paged'"),
    ({"max_batch": 0}, "max batch 0 is out of range"),
    ({"max_batch": 2.5}, "max batch 2.5 is out of range"),
    ({"max_context": 3}, "max context 3 is out of range: expected an integer from the block length 4"),
    ({"max_context": 10**9}, "max context 1000000000 is out of range"),
])
def test_bad_options_are_refused_before_anything_is_written(tmp_path, kwargs, message):
    with pytest.raises(UserError, match=message):
        export("tiny_block", tmp_path / "art", **kwargs)
    assert not any(tmp_path.iterdir())


def test_unknown_preset_is_refused_with_the_known_names(tmp_path):
    with pytest.raises(UserError, match="unknown preset 'tiny_blok'.*tiny_block"):
        export("tiny_blok", tmp_path / "art")


def test_objects_that_are_neither_models_nor_configs_are_refused(tmp_path):
    with pytest.raises(UserError, match="cannot export Linear"):
        export(torch.nn.Linear(2, 2), tmp_path / "art")


def test_failed_export_leaves_no_artifact_and_no_temporary_files(tmp_path, monkeypatch):
    real = export_module._export_graph

    def export_graph_then_fail_on_the_second(step, name, *args):
        if name == "token_decoder":
            raise RuntimeError("simulated failure while exporting token_decoder")
        return real(step, name, *args)

    monkeypatch.setattr(export_module, "_export_graph", export_graph_then_fail_on_the_second)
    with pytest.raises(RuntimeError, match="simulated failure"):
        export("tiny_block", tmp_path / "art", max_batch=2, max_context=16)
    assert list(tmp_path.iterdir()) == []


def test_failed_re_export_keeps_the_existing_artifact_intact(tmp_path, monkeypatch):
    export("tiny_vanilla", tmp_path / "art", max_batch=2, max_context=16)
    before = (tmp_path / "art" / "manifest.json").read_text()

    def fail(*args):
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(export_module, "_export_graph", fail)
    with pytest.raises(RuntimeError):
        export("tiny_vanilla", tmp_path / "art", max_batch=4, max_context=16)
    assert (tmp_path / "art" / "manifest.json").read_text() == before
    check_artifact(tmp_path / "art")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_non_empty_directory_that_is_not_an_artifact_needs_force(tmp_path):
    out = tmp_path / "notes"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(UserError, match="not empty and is not a blockrt artifact.*--force"):
        export("tiny_vanilla", out, max_batch=1, max_context=8)
    assert (out / "mine.txt").read_text() == "keep me"
    export("tiny_vanilla", out, max_batch=1, max_context=8, force=True)
    assert not (out / "mine.txt").exists()
    check_artifact(out)


def test_existing_artifact_is_replaced_by_a_new_export(tmp_path):
    export("tiny_vanilla", tmp_path / "art", max_batch=1, max_context=8)
    manifest = export("tiny_vanilla", tmp_path / "art", max_batch=2, max_context=8, cache_io="concat")
    assert Manifest.load(tmp_path / "art").cache_io == "concat" == manifest.cache_io
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


# ------------------------------------------------------------------------------------ graph checks

def test_truncated_or_garbage_onnx_is_an_artifact_error_naming_the_file(exported, tmp_path):
    good = (exported("tiny_vanilla") / "decoder.onnx").read_bytes()
    for name, data in (("truncated.onnx", good[: len(good) // 2]), ("garbage.onnx", b"\x08\xff" * 100),
                       ("empty.onnx", b"")):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ArtifactError, match=name):
            check_graph(tmp_path / name)


def _tiny_onnx(path: Path, node: onnx.NodeProto, extra_opsets=()) -> Path:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])
    graph = helper.make_graph([node], "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 24), *extra_opsets])
    onnx.save(model, str(path))
    return path


def test_graphs_with_control_flow_or_contrib_ops_are_refused(tmp_path):
    branch = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "b", [],
                               [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])])
    cond = helper.make_node("If", ["x"], ["y"], then_branch=branch, else_branch=branch)
    with pytest.raises(ArtifactError, match="If"):
        check_graph(_tiny_onnx(tmp_path / "if.onnx", cond))
    contrib = helper.make_node("FastGelu", ["x"], ["y"], domain="com.microsoft")
    with pytest.raises(ArtifactError, match="com.microsoft::FastGelu"):
        check_graph(_tiny_onnx(tmp_path / "contrib.onnx", contrib, [helper.make_opsetid("com.microsoft", 1)]))


def test_graph_io_that_differs_from_the_manifest_is_refused(exported):
    directory = exported("tiny_vanilla")
    manifest = Manifest.load(directory)
    entry = manifest.graphs["decoder"]
    path = directory / entry.file.path
    frozen = entry.inputs[0].__class__("input_ids", "int64", ("batch", 5))
    entry.inputs[0] = frozen
    with pytest.raises(ArtifactError, match="input 'input_ids' is int64 \\['batch', 'new_tokens'\\] in the graph"):
        check_graph(path, entry)
    entry.inputs.reverse()
    with pytest.raises(ArtifactError, match="graph inputs are"):
        check_graph(path, entry)


# ---------------------------------------------------------------------------------------------- CLI

def test_cli_export_from_a_checkpoint_records_its_path_and_weights(tmp_path, blockrt_cli):
    from blockrt.exporter.checkpoint import load_checkpoint, save_checkpoint

    model = init_random(build_model(get_preset("tiny_block")), seed=7)
    ckpt = save_checkpoint(model, tmp_path / "ckpt")
    code, out, err = blockrt_cli("export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "art"),
                             "--max-batch", "2", "--max-context", "32", "--dtype", "fp16", "--json")
    assert code == 0, err
    manifest = Manifest.from_dict(json.loads(out))
    assert manifest.source == str(ckpt) and manifest.dtype == "fp16"
    assert config_from_dict(manifest.model) == model.config
    saved = load_checkpoint(tmp_path / "art" / "weights.safetensors", config=model.config)
    assert torch.equal(saved.embedder.embeddings.weight, model.embedder.embeddings.weight.half())


@pytest.mark.parametrize("args, message", [
    (["--preset", "nope", "--out", "X"], "unknown preset 'nope'"),
    (["--out", "X"], "no model: pass --preset NAME"),
    (["--preset", "tiny_block", "--out", "X", "--max-context", "2"], "max context 2 is out of range"),
    (["--preset", "tiny_block", "--out", "X", "--cache-io", "paged"], "Invalid value for '--cache-io'"),
])
def test_cli_export_bad_flags_fail_with_one_line_and_exit_code_2(tmp_path, monkeypatch, blockrt_cli, args, message):
    monkeypatch.chdir(tmp_path)
    code, out, err = blockrt_cli("export", *args)
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "X").exists()
