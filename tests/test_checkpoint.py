"""Checkpoints: both official layouts round-trip, configs are inferred, bad files are named."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from blockrt.errors import UserError
from blockrt.exporter import PRESETS, build_model, get_preset, init_random
from blockrt.exporter.checkpoint import (CheckpointError, config_from_shapes, load_checkpoint, load_model,
                                         read_checkpoint_config, save_checkpoint)

IDS = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8], [2, 7, 1, 8, 2, 8, 1, 8, 2, 8, 4, 5]])


def random_model(preset: str, seed: int = 0):
    return init_random(build_model(get_preset(preset)), seed=seed).eval()


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids.to(next(model.parameters()).device))


@pytest.fixture
def block_file(tmp_path):
    """A tiny_block checkpoint file and the tensors in it."""
    path = save_checkpoint(random_model("tiny_block", seed=1), tmp_path / "ckpt")
    return path, load_file(path)


# ---------------------------------------------------------------------------------- round trips

@pytest.mark.parametrize("preset", ["tiny_block", "tiny_block_wide", "tiny_vanilla"])
def test_save_then_load_gives_identical_config_weights_and_logits(preset, tmp_path):
    model = random_model(preset, seed=4)
    save_checkpoint(model, tmp_path / "ckpt")
    loaded = load_checkpoint(tmp_path / "ckpt")
    assert loaded.config == model.config
    assert torch.equal(logits(loaded), logits(model))


def test_block_checkpoint_can_be_a_safetensors_file_name(tmp_path):
    model = random_model("tiny_block", seed=2)
    path = save_checkpoint(model, tmp_path / "weights" / "tiny.safetensors")
    assert path == tmp_path / "weights" / "tiny.safetensors"
    assert torch.equal(logits(load_checkpoint(path)), logits(model))


def test_block_checkpoint_has_exactly_the_official_keys_including_the_unused_embed_in(block_file):
    path, tensors = block_file
    cfg = get_preset("tiny_block")
    expected = set(build_model(cfg).state_dict()) | {"block_decoder.gpt_neox.embed_in.weight"}
    assert set(tensors) == expected
    assert tensors["block_decoder.gpt_neox.embed_in.weight"].shape == (cfg.vocab_size, cfg.block_decoder.hidden_size)
    for name in ("embedder.embeddings.weight", "token_decoder.gpt_neox.embed_in.weight", "token_decoder.embed_out.weight",
                 "token_decoder.expansion_layer.weight", "token_decoder.expansion_layer.bias",
                 "block_decoder.gpt_neox.layers.1.attention.query_key_value.weight",
                 "block_decoder.gpt_neox.final_layer_norm.bias", "token_decoder.gpt_neox.layers.1.mlp.dense_4h_to_h.bias"):
        assert name in tensors


def test_block_checkpoint_without_the_unused_embed_in_loads(block_file, tmp_path):
    path, tensors = block_file
    del tensors["block_decoder.gpt_neox.embed_in.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    assert torch.equal(logits(load_checkpoint(tmp_path)), logits(load_checkpoint(path)))


def test_vanilla_checkpoint_is_a_pythia_directory(tmp_path):
    save_checkpoint(random_model("tiny_vanilla"), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["GPTNeoXForCausalLM"] and config["model_type"] == "gpt_neox"
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"]) == (64, 2, 2)
    assert config["use_parallel_residual"] is True and config["tie_word_embeddings"] is False
    assert config["eos_token_id"] == 0 and config["torch_dtype"] == "float32"
    keys = set(load_file(tmp_path / "model.safetensors"))
    assert "embed_out.weight" in keys and "gpt_neox.embed_in.weight" in keys
    assert all(k.startswith("gpt_neox.") or k == "embed_out.weight" for k in keys)


def test_vanilla_checkpoint_cannot_be_a_single_file(tmp_path):
    with pytest.raises(CheckpointError, match="directory"):
        save_checkpoint(random_model("tiny_vanilla"), tmp_path / "model.safetensors")


def test_sharded_pythia_checkpoint_with_an_index_loads(tmp_path):
    transformers = pytest.importorskip("transformers", reason="writing sharded HF checkpoints needs transformers")
    model = random_model("tiny_vanilla", seed=6)
    save_checkpoint(model, tmp_path / "ours")
    hf = transformers.GPTNeoXForCausalLM.from_pretrained(tmp_path / "ours")
    hf.save_pretrained(tmp_path / "sharded", safe_serialization=True, max_shard_size="200KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    assert torch.equal(logits(load_checkpoint(tmp_path / "sharded")), logits(model))


def test_old_hugging_face_attention_buffers_are_ignored(tmp_path):
    model = random_model("tiny_vanilla", seed=7)
    save_checkpoint(model, tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    for i in range(2):
        tensors[f"gpt_neox.layers.{i}.attention.bias"] = torch.ones(1, 1, 8, 8, dtype=torch.bool).tril()
        tensors[f"gpt_neox.layers.{i}.attention.masked_bias"] = torch.tensor(-1e9)
        tensors[f"gpt_neox.layers.{i}.attention.rotary_emb.inv_freq"] = torch.ones(4)
    save_file(tensors, tmp_path / "model.safetensors")
    assert torch.equal(logits(load_checkpoint(tmp_path)), logits(model))


# -------------------------------------------------------------------------------------- dtypes

@pytest.mark.parametrize("dtype, torch_dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
@pytest.mark.parametrize("preset", ["tiny_block", "tiny_vanilla"])
def test_load_in_half_precision_casts_every_weight(preset, dtype, torch_dtype, tmp_path):
    model = random_model(preset, seed=3)
    save_checkpoint(model, tmp_path)
    loaded = load_checkpoint(tmp_path, dtype=dtype)
    assert {p.dtype for p in loaded.parameters()} == {torch_dtype}
    for (name, p), q in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(p.to(torch_dtype), q), name


def test_checkpoint_is_saved_in_the_model_dtype_and_loaded_in_it_by_default(tmp_path):
    model = random_model("tiny_block", seed=3).to(torch.bfloat16)
    path = save_checkpoint(model, tmp_path)
    with safe_open(str(path), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    loaded = load_checkpoint(tmp_path)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert torch.equal(logits(loaded), logits(model))


def test_unknown_dtype_is_a_user_error(block_file):
    with pytest.raises(UserError, match="unknown dtype 'fp8'"):
        load_checkpoint(block_file[0], dtype="fp8")


# --------------------------------------------------------------------------------------- config

@pytest.mark.parametrize("preset", list(PRESETS))
def test_config_inferred_from_tensor_shapes_equals_the_preset(preset):
    with torch.device("meta"):
        model = build_model(PRESETS[preset])
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert config_from_shapes(shapes) == PRESETS[preset]


def test_config_is_read_from_the_checkpoint_without_loading_weights(block_file):
    assert read_checkpoint_config(block_file[0]) == get_preset("tiny_block")


def test_explicit_config_overrides_the_checkpoint(block_file):
    path, _ = block_file
    assert load_checkpoint(path, config="tiny_block").config == get_preset("tiny_block")
    override = dataclasses.replace(get_preset("tiny_block"), pad_token_id=5, eos_token_id=7)
    assert load_checkpoint(path, config=override).config == override


def test_pythia_config_json_beats_the_head_size_rule(tmp_path):
    save_checkpoint(random_model("tiny_vanilla"), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["num_attention_heads"] = 4  # head size 16 instead of the rule's 32
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert load_checkpoint(tmp_path).config.decoder.num_heads == 4


def test_explicit_config_of_another_shape_names_the_missing_tensors(block_file):
    with pytest.raises(CheckpointError, match=r"missing 12 tensor\(s\) that config 'tiny_block_wide' needs: 'token_decoder\.gpt_neox\.layers\.2\."):
        load_checkpoint(block_file[0], config="tiny_block_wide")


def test_explicit_config_of_another_kind_is_rejected(block_file):
    with pytest.raises(CheckpointError, match="is a block checkpoint, but the given config is a vanilla model"):
        load_checkpoint(block_file[0], config="tiny_vanilla")


def test_unknown_preset_as_config_is_a_user_error(block_file):
    with pytest.raises(UserError, match="unknown preset 'nope'"):
        load_checkpoint(block_file[0], config="nope")


def test_load_model_gives_random_weights_for_a_preset_and_applies_the_pad_override():
    model = load_model(config="tiny_block", seed=9, pad_token_id=3)
    assert model.config == dataclasses.replace(get_preset("tiny_block"), pad_token_id=3)
    assert torch.equal(logits(model), logits(random_model("tiny_block", seed=9)))
    with pytest.raises(UserError, match="pad token id 512 is outside the vocabulary"):
        load_model(config="tiny_block", pad_token_id=512)


# ------------------------------------------------------------------------------- bad checkpoints

def test_missing_tensor_is_named_with_the_file(block_file, tmp_path):
    _, tensors = block_file
    del tensors["token_decoder.gpt_neox.layers.1.attention.dense.bias"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(tmp_path, config="tiny_block")
    assert "'token_decoder.gpt_neox.layers.1.attention.dense.bias'" in str(e.value)
    assert "missing" in str(e.value) and str(tmp_path / "model.safetensors") in str(e.value)


def test_unexpected_tensor_is_named_with_the_file(block_file, tmp_path):
    _, tensors = block_file
    tensors["token_decoder.extra.weight"] = torch.zeros(3)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"unexpected .*'token_decoder\.extra\.weight'") as e:
        load_checkpoint(tmp_path)
    assert str(tmp_path / "model.safetensors") in str(e.value)


def test_wrong_shape_names_the_tensor_both_shapes_and_the_file(block_file, tmp_path):
    _, tensors = block_file
    tensors["token_decoder.embed_out.weight"] = torch.zeros(500, 64)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(tmp_path)
    message = str(e.value)
    assert "'token_decoder.embed_out.weight'" in message
    assert "[500, 64]" in message and "[512, 64]" in message
    assert str(tmp_path / "model.safetensors") in message


@pytest.mark.parametrize("name", ["token_decoder.gpt_neox.layers.0.mlp.dense_h_to_4h.weight",
                                  "block_decoder.gpt_neox.final_layer_norm.weight", "embedder.embeddings.weight"])
def test_a_mis_shaped_tensor_the_config_is_inferred_from_is_the_one_named(block_file, tmp_path, name):
    _, tensors = block_file
    good = list(tensors[name].shape)
    tensors[name] = torch.zeros(good[0] + 4, *good[1:])  # its neighbours (bias, other layers) still agree
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=rf"tensor '{name}' .* has shape \[{good[0] + 4}.*expects \[{good[0]}"):
        load_checkpoint(tmp_path)


def test_wrong_shape_in_a_pythia_directory_is_checked_against_config_json(tmp_path):
    save_checkpoint(random_model("tiny_vanilla"), tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["gpt_neox.layers.0.mlp.dense_h_to_4h.weight"] = torch.zeros(128, 64)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"'gpt_neox\.layers\.0\.mlp\.dense_h_to_4h\.weight'.*\[128, 64\].*\[256, 64\]"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("content", [b"not a safetensors file at all", b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":", b""],
                         ids=["garbage", "truncated-header", "empty"])
def test_corrupt_safetensors_file_is_a_clear_error(tmp_path, content):
    (tmp_path / "model.safetensors").write_bytes(content)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_checkpoint(tmp_path)


def test_truncated_tensor_data_is_a_clear_error(block_file, tmp_path):
    data = block_file[0].read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_checkpoint(tmp_path)


def test_paths_that_are_not_checkpoints_are_named(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_checkpoint(tmp_path)
    save_file({"foo.weight": torch.zeros(2)}, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="neither a Block Transformer checkpoint .* nor a Pythia one"):
        load_checkpoint(tmp_path)


def test_checkpoint_errors_are_user_errors():
    assert issubclass(CheckpointError, UserError)
