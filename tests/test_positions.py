"""--positions official-generate: the token-decoder positions of the official generate() (both
prefix vectors at 0, token k of a block at k instead of k + 1) on every path (reference, ONNX
export, runtime backends), recorded in the manifest; the default stays the training forward's."""

from __future__ import annotations

import json

import pytest
import torch

from blockrt.errors import UserError
from blockrt.exporter import build_model, get_preset, init_random
from blockrt.exporter import model as model_module
from blockrt.exporter.export import export
from blockrt.exporter.generate import generate
from blockrt.exporter.model import token_positions
from blockrt.graphs.manifest import Manifest
from blockrt.runtime import GenerationConfig, Model
from blockrt.runtime.verify import REL_TOLERANCE, verify

PROMPTS = [[5, 6, 7, 8, 9], [11, 12, 13]]
OFFICIAL = "official-generate"

# Hand-computed for block length 4. Each local step of one block: the slots it feeds, the positions
# of the training forward (slot = position), and those of the official generate(), whose Hugging
# Face generate derives positions as cumsum(attention mask of the token ids) - 1: the first step
# has one id (the BOS placeholder) whose position 0 both prefix vectors share, then token k of the
# block (k = 1..3) is id k + 1 of the sequence, at position k.
TABLE = [  # (slots, forward, official)
    ([0, 1], [0, 1], [0, 0]),
    ([2], [2], [1]),
    ([3], [3], [2]),
    ([4], [4], [3]),
]


@pytest.fixture(scope="module")
def model():
    return init_random(build_model(get_preset("tiny_block")), seed=3).eval()


def test_token_positions_follow_the_hand_computed_table():
    for slots, forward, official in TABLE:
        assert token_positions(torch.tensor(slots)).tolist() == forward
        assert token_positions(torch.tensor(slots), OFFICIAL).tolist() == official


@pytest.mark.parametrize("positions, column", [(None, 1), ("forward", 1), (OFFICIAL, 2)])
def test_reference_generate_feeds_the_token_decoder_the_table_positions_every_block(model, positions, column):
    seen = []
    hook = model.token_decoder.gpt_neox.register_forward_pre_hook(lambda m, args: seen.append(args[1][0].tolist()))
    try:
        generate(model, [PROMPTS[0]], GenerationConfig(max_new_tokens=8, ignore_eos=True, positions=positions))
    finally:
        hook.remove()
    assert seen == [row[column] for row in TABLE] * 2  # two blocks, the table restarts at each


def test_teacher_forced_forward_uses_the_same_positions_per_mode(model):
    seen = []
    hook = model.token_decoder.gpt_neox.register_forward_pre_hook(lambda m, args: seen.append(args[1][0].tolist()))
    try:
        ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
        model(ids)
        model(ids, OFFICIAL)
    finally:
        hook.remove()
    assert seen == [[0, 1, 2, 3, 4], [0, 0, 1, 2, 3]]


def test_official_positions_change_the_logits_and_the_default_is_the_forward_pass(model):
    def logits(**kwargs):
        config = GenerationConfig(max_new_tokens=8, ignore_eos=True, **kwargs)
        return torch.stack([t for row in generate(model, PROMPTS, config, record_logits=True).logits for t in row])

    default, forward, official = logits(), logits(positions="forward"), logits(positions=OFFICIAL)
    assert torch.equal(default, forward)
    # above the fp32 tolerance of verify, so checking an export against the wrong mode fails
    assert ((official - forward).norm() / forward.norm()).item() > 2 * REL_TOLERANCE["fp32"]
    recompute = torch.stack([t for row in generate(model, PROMPTS, GenerationConfig(
        max_new_tokens=8, ignore_eos=True, positions=OFFICIAL), use_cache=False, record_logits=True).logits for t in row])
    torch.testing.assert_close(recompute, official, rtol=1e-5, atol=1e-5)  # cached steps == teacher forcing


@pytest.fixture(scope="module")
def official_artifact(tmp_path_factory, model):
    out = tmp_path_factory.mktemp("official") / "tiny"
    export(model, out, max_batch=2, max_context=64, positions=OFFICIAL)
    return out


def test_export_records_the_positions_and_the_graphs_match_the_official_reference(official_artifact, exported):
    assert Manifest.load(official_artifact).positions == OFFICIAL
    assert Manifest.load(exported("tiny_block")).positions == "forward"
    report = verify(official_artifact, gen_tokens=24)  # steps and tokens against the official-position reference
    assert report.passed, report.format_table()


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_every_backend_generates_the_official_reference_tokens(official_artifact, model, backend):
    config = GenerationConfig(max_new_tokens=16, ignore_eos=True)
    expected = generate(model, PROMPTS, GenerationConfig(max_new_tokens=16, ignore_eos=True, positions=OFFICIAL)).tokens
    runtime = Model.load(official_artifact, backend=backend, device="cpu")
    assert [r.token_ids for r in runtime.generate(PROMPTS, config)] == expected
    if backend == "torch":  # ONNX Runtime's graphs are checked step by step by verify above
        assert runtime.engines["token_decoder"].step.positions == OFFICIAL
    with pytest.raises(UserError, match="uses 'official-generate' positions .* re-export with --positions forward"):
        runtime.generate(PROMPTS, GenerationConfig(max_new_tokens=4, positions="forward"))


def test_official_graphs_build_with_tensorrt_rtx(official_artifact, tmp_path):
    pytest.importorskip("tensorrt_rtx_bindings", reason="TensorRT-RTX is not installed: no engines to build")
    import shutil

    from blockrt.runtime.build import build_engines

    directory = shutil.copytree(official_artifact, tmp_path / "tiny")
    assert sorted(build_engines(directory, backend="tensorrt-rtx").engines) == ["block_decoder", "token_decoder"]


def test_cli_generate_and_export_take_the_positions_flag(blockrt_cli, model, tmp_path, monkeypatch):
    modes = []
    real = model_module.token_positions
    monkeypatch.setattr(model_module, "token_positions", lambda slots, positions="forward": modes.append(positions)
                        or real(slots, positions))
    code, out, err = blockrt_cli("generate", "--preset", "tiny_block", "--seed", "3", "--prompt-ids", "5,6,7,8,9",
                                 "--max-new-tokens", "8", "--ignore-eos", "--positions", OFFICIAL, "--json")
    assert code == 0, err
    expected = generate(model, [PROMPTS[0]], GenerationConfig(max_new_tokens=8, ignore_eos=True, positions=OFFICIAL))
    assert json.loads(out)[0]["token_ids"] == expected.tokens[0] and set(modes) == {OFFICIAL}
    code, _, err = blockrt_cli("export", "--preset", "tiny_block", "--out", str(tmp_path / "x"), "--positions", "other")
    assert code == 2 and "--positions" in err and not (tmp_path / "x").exists()
