"""Artifacts that recover: engines are derived files (a bad one fails only the TensorRT backend and
`blockrt build` replaces it), the manifest is checked against itself, its digest, the graph
contract and the files it describes (every edit is a one-line exit-2 error), and stale
temporaries of killed exports are cleaned up."""

from __future__ import annotations

import copy
import json
import os

import pytest
from safetensors.torch import load_file, save_file

from blockrt.exporter.export import export
from blockrt.graphs.manifest import ArtifactError, EngineEntry, FileEntry, Manifest, manifest_digest, sha256_file
from blockrt.runtime import GenerationConfig, Model
from blockrt.runtime.verify import verify

GREEDY = GenerationConfig(max_new_tokens=8, ignore_eos=True)


def _fake_engine(directory, graph: str, data: bytes = b"not an engine") -> None:
    """Record an engine file in the manifest as `blockrt build` would (a placeholder: its bytes are
    never deserialised here, only hashed)."""
    (directory / f"{graph}.engine").write_bytes(data)
    manifest = Manifest.load(directory, verify_hashes=False)
    manifest.engines[graph] = EngineEntry(graph, FileEntry(f"{graph}.engine", sha256_file(directory / f"{graph}.engine")),
                                          "tensorrt-rtx", "1.7.1", "portable", "portable", {})
    manifest.save(directory)


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_a_bad_engine_fails_only_the_tensorrt_backend_with_the_rebuild_command(artifact_copy, blockrt_cli, damage):
    directory = artifact_copy("tiny_vanilla")
    expected = [r.token_ids for r in Model.load(directory).generate([[1, 2, 3]], GREEDY)]
    _fake_engine(directory, "decoder", b"x" * 100)
    if damage == "truncate":
        with open(directory / "decoder.engine", "r+b") as f:
            f.truncate(10)
    else:
        (directory / "decoder.engine").unlink()
    for backend in ("onnxruntime", "torch"):
        model = Model.load(directory, backend=backend, device="cpu")
        assert [r.token_ids for r in model.generate([[1, 2, 3]], GREEDY)] == expected
    code, out, err = blockrt_cli("run", str(directory), "--backend", "onnxruntime", "--prompt-ids", "1,2,3",
                                 "--max-new-tokens", "4")
    assert code == 0, err
    with pytest.raises(ArtifactError, match=rf"decoder.engine .*rebuild them with `blockrt build {directory}`"):
        Manifest.load(directory).verify_engine(directory, "decoder")


def test_verify_shows_a_changed_engine_as_a_failed_file_check_and_still_checks_onnxruntime(artifact_copy, blockrt_cli):
    directory = artifact_copy("tiny_vanilla")
    _fake_engine(directory, "decoder")
    (directory / "decoder.engine").write_bytes(b"corrupted")
    report = verify(directory, gen_tokens=4)
    (bad,) = [c for c in report.checks if not c.passed]
    assert (bad.backend, bad.output) == ("files", "decoder.engine") and "blockrt build" in bad.detail
    assert any(c.backend == "onnxruntime" and c.stage.startswith("generate") and c.passed for c in report.checks)
    code, out, err = blockrt_cli("verify", str(directory), "--gen-tokens", "4")
    assert code == 1 and "decoder.engine" in out and "FAIL" in out and out.rstrip().endswith("FAILED")


def test_blockrt_build_replaces_a_corrupt_or_missing_engine(artifact_copy, blockrt_cli):
    pytest.importorskip("tensorrt_rtx_bindings", reason="TensorRT-RTX is not installed: no engines to build")
    directory = artifact_copy("tiny_vanilla")
    assert blockrt_cli("build", str(directory), "--backend", "tensorrt-rtx")[0] == 0
    with open(directory / "decoder.engine", "r+b") as f:
        f.truncate(100)
    code, _, err = blockrt_cli("build", str(directory), "--backend", "tensorrt-rtx")
    assert code == 0, err
    Manifest.load(directory).verify_engine(directory, "decoder")  # the new engine matches the manifest
    (directory / "decoder.engine").unlink()
    assert blockrt_cli("build", str(directory), "--backend", "tensorrt-rtx")[0] == 0
    assert (directory / "decoder.engine").is_file()


# ------------------------------------------------------------------------------------ the manifest

def _leaves(value, path=()):
    """Every (path, value) of a JSON document whose value is not a container, plus every container."""
    yield path, value
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _leaves(v, (*path, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _leaves(v, (*path, i))


def _mutated(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, list):
        return value[:-1] if value else [1]
    if isinstance(value, dict):
        return {**value, "extra": 1}
    return 0  # null


def _set(document, path, value):
    target = document
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value


def test_every_manifest_field_changed_by_hand_is_a_one_line_exit_2_error(artifact_copy, blockrt_cli):
    directory = artifact_copy("tiny_block")
    path = directory / "manifest.json"
    original = json.loads(path.read_text())
    cases = [p for p, _ in _leaves(original) if p]
    assert len(cases) > 200  # every field of every graph input and output, limits, config, files, digest
    failures = []
    for field in cases:
        document = copy.deepcopy(original)
        _set(document, field, _mutated(_get(original, field)))
        path.write_text(json.dumps(document))
        code, out, err = blockrt_cli("run", str(directory), "--backend", "onnxruntime", "--prompt-ids", "1,2,3",
                                     "--max-new-tokens", "2")
        lines = err.strip().splitlines()
        if code != 2 or len(lines) != 1 or not lines[0].startswith("Error:") or out:
            failures.append((field, code, err[-300:]))
    assert not failures, failures[:5]
    path.write_text(json.dumps(original))
    assert blockrt_cli("run", str(directory), "--backend", "onnxruntime", "--prompt-ids", "1,2,3")[0] == 0


def _get(document, path):
    for key in path:
        document = document[key]
    return document


def _reseal(directory, edit) -> None:
    """Edit manifest.json and recompute its digest, as a tool that rewrites manifests would."""
    path = directory / "manifest.json"
    document = json.loads(path.read_text())
    edit(document)
    document["manifest_sha256"] = manifest_digest(document)
    path.write_text(json.dumps(document))


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(vocab_size=1024), "vocab_size is 1024, but the model config says 512"),
    (lambda d: d["model"]["token_decoder"].update(hidden_size=128),
     "graph 'block_decoder' outputs differ from the graph contract"),
    (lambda d: d["limits"].update(max_context=4096), "limits.cache_len is 40, but max_context 4096 needs 1024"),
    (lambda d: d["graphs"]["token_decoder"]["inputs"][0].update(shape=["batch", 3]),
     "graph 'token_decoder' inputs differ from the graph contract .*input_ids"),
    (lambda d: d.update(dtype="int8"), "dtype 'int8' is not one of"),
    (lambda d: d["graphs"]["block_decoder"]["file"].update(path="../elsewhere.onnx"), "not a file name inside"),
    (lambda d: d.update(cache_io="concat"), "inputs differ from the graph contract"),
    (lambda d: d.update(positions="official"), "positions 'official' is not one of forward, official-generate"),
    (lambda d: d["engines"].update(decoder={"graph": "decoder", "file": {"path": "decoder.engine", "sha256": ""},
                                            "library": "tensorrt", "library_version": "10.15", "device": "x",
                                            "compute_capability": "9.0", "profiles": {}}),
     "engine entry 'decoder' names graph 'decoder'"),
])
def test_edits_that_keep_the_digest_are_caught_by_the_field_checks(artifact_copy, edit, message):
    directory = artifact_copy("tiny_block")
    _reseal(directory, edit)
    with pytest.raises(ArtifactError, match=message):
        Manifest.load(directory)


def test_weights_that_do_not_fit_the_manifest_name_the_tensor(artifact_copy):
    directory = artifact_copy("tiny_vanilla")
    weights = directory / "weights.safetensors"
    tensors = load_file(weights)
    tensors["embed_out.weight"] = tensors["embed_out.weight"][:100]
    save_file(tensors, weights)
    _reseal(directory, lambda d: d["assets"]["weights"].update(sha256=sha256_file(weights)))
    with pytest.raises(ArtifactError, match=r"'embed_out.weight' .* has shape \[100, 64\], but .* expects \[512, 64\]"):
        Manifest.load(directory)


def test_onnx_files_whose_declared_io_differs_from_the_manifest_are_refused(artifact_copy, exported):
    directory = artifact_copy("tiny_vanilla")
    other = exported("tiny_vanilla", "concat")  # same model, other graph contract
    (directory / "decoder.onnx").write_bytes((other / "decoder.onnx").read_bytes())
    _reseal(directory, lambda d: d["graphs"]["decoder"]["file"].update(sha256=sha256_file(directory / "decoder.onnx")))
    with pytest.raises(ArtifactError, match="decoder.onnx: graph inputs are .*'attention_mask'\]"):
        Manifest.load(directory)


# ---------------------------------------------------------------------------- killed exports

def test_an_export_removes_temporaries_that_killed_exports_of_the_same_target_left(tmp_path):
    stale = [tmp_path / ".art.tmp-0123abcd", tmp_path / ".art.tmp-999999999-0123abcd", tmp_path / ".art.old-4567"]
    running = tmp_path / f".art.tmp-{os.getpid()}-89abcdef"  # an export in progress in a live process
    other = tmp_path / ".other.tmp-999999999-0123abcd"  # another target's
    for d in [*stale, running, other]:
        d.mkdir()
        (d / "block_decoder.onnx").write_bytes(b"partial")
    export("tiny_vanilla", tmp_path / "art", max_batch=1, max_context=8)
    assert not any(d.exists() for d in stale)
    assert running.is_dir() and other.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([".other.tmp-999999999-0123abcd", running.name, "art"])
