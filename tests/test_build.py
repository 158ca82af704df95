"""TensorRT engine build: engines for every graph (with TensorRT-RTX, which builds without a GPU),
profiles from the export limits, engine compatibility checks, and clear errors when TensorRT is
missing or cannot parse a graph."""

from __future__ import annotations

import importlib
import json
import sys
import types

import onnx
import pytest
from onnx import TensorProto, helper

from blockrt.errors import MissingDependencyError, UserError
from blockrt.graphs.manifest import ArtifactError, EngineEntry, FileEntry, Manifest, sha256_file
from blockrt.runtime import trt_lib
from blockrt.runtime.build import BuildError, build_engines, check_engine_compatible, engine_profiles
from blockrt.runtime.trt_lib import TrtLib, load_trt

from conftest import TEST_MAX_BATCH, TEST_MAX_CONTEXT

build_module = sys.modules["blockrt.runtime.build"]


@pytest.fixture(scope="module")
def rtx():
    return pytest.importorskip("tensorrt_rtx_bindings", reason="TensorRT-RTX (pip install 'blockrt[rtx]') is not "
                               "installed: engine builds are not tested")


@pytest.mark.parametrize("preset, cache_io", [("tiny_block", "inplace"), ("tiny_block", "concat"),
                                              ("tiny_vanilla", "inplace"), ("tiny_vanilla", "concat")])
def test_every_graph_builds_into_a_portable_engine_recorded_in_the_manifest(rtx, artifact_copy, preset, cache_io):
    directory = artifact_copy(preset, cache_io)
    manifest = build_engines(directory, backend="tensorrt-rtx")
    assert set(manifest.engines) == set(manifest.graphs)
    reloaded = Manifest.load(directory)  # verifies the engines' hashes too
    for name, entry in reloaded.engines.items():
        assert entry.file.path == f"{name}.engine"
        assert entry.file.sha256 == sha256_file(directory / entry.file.path)
        assert (entry.library, entry.library_version) == ("tensorrt-rtx", rtx.__version__)
        assert (entry.device, entry.compute_capability) == ("portable", "portable")
        assert entry.profiles == engine_profiles(reloaded)[name]
    assert not list(directory.glob(".*.tmp"))


def test_fp16_graphs_build_too(rtx, artifact_copy):
    manifest = build_engines(artifact_copy("tiny_block", "inplace", "fp16"), backend="tensorrt-rtx")
    assert set(manifest.engines) == {"block_decoder", "token_decoder"}


def test_profiles_span_the_export_limits_per_graph(exported):
    manifest = Manifest.load(exported("tiny_block", "concat"))
    L, blocks = manifest.block_len, manifest.limits.cache_len
    p = engine_profiles(manifest, opt_batch=2, opt_context=40)
    block, token = p["block_decoder"], p["token_decoder"]
    assert block["input_ids"] == {"min": [1, L], "opt": [2, L], "max": [TEST_MAX_BATCH, blocks * L]}
    assert block["past_key_values.0.key"]["min"][2] == 0  # prefill starts from an empty concat cache
    assert block["past_key_values.0.key"]["opt"][2] == 10 and block["past_key_values.0.key"]["max"][2] == blocks - 1
    assert block["attention_mask"] == {"min": [1, 1], "opt": [2, 11], "max": [TEST_MAX_BATCH, blocks]}
    assert token["input_ids"] == {"min": [1, 1], "opt": [2, 1], "max": [TEST_MAX_BATCH, 2]}
    assert [token["past_key_values.0.value"][k][2] for k in ("min", "opt", "max")] == [0, 2, L]

    vanilla = engine_profiles(Manifest.load(exported("tiny_vanilla")))["decoder"]
    assert vanilla["input_ids"] == {"min": [1, 1], "opt": [TEST_MAX_BATCH, 1], "max": [TEST_MAX_BATCH, TEST_MAX_CONTEXT]}
    assert vanilla["past_key_values.0.key"]["max"][2] == TEST_MAX_CONTEXT  # static in-place cache


@pytest.mark.parametrize("kwargs, message", [({"opt_batch": TEST_MAX_BATCH + 1}, "--opt-batch 5 is outside"),
                                             ({"opt_context": 0}, "--opt-context 0 is outside")])
def test_opt_shapes_outside_the_export_limits_are_refused(exported, kwargs, message):
    with pytest.raises(UserError, match=message):
        engine_profiles(Manifest.load(exported("tiny_vanilla")), **kwargs)


def _fake_import_without_tensorrt(monkeypatch):
    """Make `import tensorrt` and `import tensorrt_rtx_bindings` fail as if neither were installed."""
    real = importlib.import_module

    def fake_import_module(name, *args):
        if name in ("tensorrt", "tensorrt_rtx_bindings"):
            raise ModuleNotFoundError(f"No module named '{name}'")
        return real(name, *args)

    monkeypatch.setattr(trt_lib.importlib, "import_module", fake_import_module)


def test_missing_tensorrt_says_which_extra_to_install(monkeypatch, artifact_copy, blockrt_cli):
    _fake_import_without_tensorrt(monkeypatch)
    with pytest.raises(MissingDependencyError, match=r"pip install 'blockrt\[trt\]' or pip install 'blockrt\[rtx\]'"):
        load_trt("auto")
    with pytest.raises(MissingDependencyError, match=r"tensorrt-rtx is not installed.*pip install 'blockrt\[rtx\]'$"):
        load_trt("tensorrt-rtx")
    directory = artifact_copy("tiny_vanilla")
    code, out, err = blockrt_cli("build", str(directory))
    assert code == 2 and "pip install 'blockrt[trt]'" in err and "Traceback" not in err
    assert Manifest.load(directory).engines == {}


def test_tensorrt_placeholder_package_without_the_api_falls_back_to_tensorrt_rtx(rtx, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))
    lib = load_trt("auto")
    assert (lib.name, lib.module) == ("tensorrt-rtx", rtx)
    with pytest.raises(MissingDependencyError, match="no TensorRT API"):
        load_trt("tensorrt")


def test_unknown_backend_is_refused():
    with pytest.raises(UserError, match="unknown TensorRT backend 'cuda'"):
        load_trt("cuda")


def test_graph_tensorrt_cannot_parse_fails_naming_the_node(rtx, tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.STRING, ["batch"])
    y = helper.make_tensor_value_info("y", TensorProto.STRING, ["batch"])
    node = helper.make_node("StringNormalizer", ["x"], ["y"], name="normalize_text")
    path = tmp_path / "decoder.onnx"
    onnx.save(helper.make_model(helper.make_graph([node], "g", [x], [y]),
                                opset_imports=[helper.make_opsetid("", 24)]), str(path))
    lib = load_trt("tensorrt-rtx")
    logger = build_module._logger(lib.module)
    with pytest.raises(BuildError, match="cannot parse .*decoder.onnx: .*node 'normalize_text' \\(StringNormalizer\\)"):
        build_module._build(lib, lib.module.Builder(logger), logger, path, {}, None)


def test_failed_build_leaves_earlier_engines_and_manifest_untouched(rtx, artifact_copy, monkeypatch):
    directory = artifact_copy("tiny_block")
    build_engines(directory, backend="tensorrt-rtx")
    before = {p.name: p.read_bytes() for p in directory.iterdir()}
    real = build_module._build

    def build_then_fail_on_token_decoder(lib, builder, logger, onnx_path, *args):
        if onnx_path.stem == "token_decoder":
            raise BuildError("simulated build failure")
        return real(lib, builder, logger, onnx_path, *args)

    monkeypatch.setattr(build_module, "_build", build_then_fail_on_token_decoder)
    with pytest.raises(BuildError, match="simulated"):
        build_engines(directory, backend="tensorrt-rtx", opt_batch=1)
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == before


def test_build_refuses_an_artifact_whose_files_do_not_match_the_manifest(artifact_copy):
    directory = artifact_copy("tiny_vanilla")
    with open(directory / "decoder.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ArtifactError, match="decoder.onnx does not match manifest.json"):
        build_engines(directory)


def test_cli_build_prints_the_engines_as_json(rtx, artifact_copy, blockrt_cli):
    directory = artifact_copy("tiny_vanilla")
    code, out, err = blockrt_cli("build", str(directory), "--backend", "tensorrt-rtx", "--opt-batch", "2", "--json")
    assert code == 0, err
    engines = json.loads(out)
    assert engines["decoder"]["profiles"]["input_ids"]["opt"] == [2, 1]


# ------------------------------------------------------------------------------- compatibility

def _entry(library="tensorrt", version="10.15.1", device="NVIDIA L4", capability="8.9") -> EngineEntry:
    return EngineEntry("decoder", FileEntry("decoder.engine", ""), library, version, device, capability, {})


def _fake_trt(name="tensorrt", version="10.15.1"):
    """A stand-in TensorRT module: only its name and version matter here."""
    module = types.ModuleType(trt_lib.LIBRARIES[name][0])
    module.__version__ = version
    return module


def test_engines_from_another_library_or_version_are_refused_with_the_rebuild_command(exported):
    manifest = Manifest.load(exported("tiny_vanilla"))
    with pytest.raises(UserError, match=r"built with tensorrt 10.15.1, but this process loaded tensorrt 10.16.0; "
                                        r"rebuild the engines here with `blockrt build art --backend tensorrt`"):
        check_engine_compatible(manifest, _entry(), _fake_trt(version="10.16.0"), directory="art")
    with pytest.raises(UserError, match="loaded tensorrt-rtx 10.15.1"):
        check_engine_compatible(manifest, _entry(), _fake_trt("tensorrt-rtx"))


def test_engines_for_another_gpu_are_refused(exported, monkeypatch):
    manifest = Manifest.load(exported("tiny_vanilla"))
    monkeypatch.setattr(build_module, "current_gpu", lambda: ("NVIDIA H100 80GB HBM3", "9.0"))
    with pytest.raises(UserError, match=r"for NVIDIA L4 \(compute capability 8.9\), but this GPU is NVIDIA H100"):
        check_engine_compatible(manifest, _entry(), _fake_trt())
    check_engine_compatible(manifest, _entry(device="NVIDIA H100 PCIe", capability="9.0"), _fake_trt())


def test_portable_engines_are_refused_on_gpus_tensorrt_rtx_does_not_support(rtx, exported, monkeypatch):
    manifest = Manifest.load(exported("tiny_vanilla"))
    entry = _entry("tensorrt-rtx", rtx.__version__, "portable", "portable")
    monkeypatch.setattr(build_module, "current_gpu", lambda: ("NVIDIA H100 80GB HBM3", "9.0"))
    with pytest.raises(UserError, match=r"does not run on NVIDIA H100.*pip install 'blockrt\[trt\]'"):
        check_engine_compatible(manifest, entry, TrtLib(rtx, "tensorrt-rtx", rtx.__version__))
    monkeypatch.setattr(build_module, "current_gpu", lambda: ("NVIDIA GeForce RTX 4090", "8.9"))
    check_engine_compatible(manifest, entry, rtx)
