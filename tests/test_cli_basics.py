"""The `presets`, `generate` and `demo` verbs: output, flags, and one-line errors with exit code 2."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest

from blockrt.cli.demo import STAGES, Demo, Stage, run_stages
from blockrt.exporter import PRESETS, build_model, get_preset, init_random
from blockrt.exporter.checkpoint import save_checkpoint
from blockrt.exporter.generate import generate
from blockrt.generation import GenerationConfig


@pytest.fixture
def cli(blockrt_cli):
    return blockrt_cli


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory) -> Path:
    """A word-level tokenizer.json with ids inside the tiny presets' vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["[UNK]", "the", "cat", "sat", "on", "a", "mat", "dog", "ran"] + [f"w{i}" for i in range(100)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return path


def test_version_prints_the_package_version(cli):
    from blockrt import __version__

    code, out, _ = cli("--version")
    assert code == 0 and out.strip() == f"blockrt, version {__version__}"


# ------------------------------------------------------------------------------------- presets

def test_presets_json_lists_every_preset_with_parameter_counts(cli):
    code, out, _ = cli("presets", "--json")
    assert code == 0
    rows = json.loads(out)
    assert [r["name"] for r in rows] == list(PRESETS)
    for r in rows:
        assert r["kind"] in ("block", "vanilla")
        assert r["params"] > r["non_embedding_params"] > 0


@pytest.mark.parametrize("name, size", [("block_main_b4_5", 5e6), ("block_main_b4_19", 19e6), ("block_main_b4_85", 85e6),
                                        ("block_main_b4_300", 300e6), ("block_main_b4_800", 800e6),
                                        ("block_main_b4_1.2b", 1.2e9)])
def test_block_main_non_embedding_params_are_within_3_percent_of_the_name(cli, name, size):
    rows = {r["name"]: r for r in json.loads(cli("presets", "--json")[1])}
    assert abs(rows[name]["non_embedding_params"] / size - 1) < 0.03


def test_presets_table_shows_shapes_and_counts(cli):
    code, out, _ = cli("presets")
    assert code == 0
    lines = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert list(lines) == list(PRESETS)
    assert re.search(r"block 6 x 768, token 6 x 768\s+4\s+173\.2M\s+86\.2M", lines["block_main_b4_85"])
    assert re.search(r"24 x 1024\s+1\s+405\.3M\s+302\.3M", lines["vanilla_410"])


# ------------------------------------------------------------------------------------ generate

def test_generate_json_matches_the_reference_generate_on_the_same_random_weights(cli):
    code, out, _ = cli("generate", "--preset", "tiny_block", "--seed", "3", "--prompt-ids", "1,2,3",
                       "--prompt-ids", "4, 5,6,7,8", "--max-new-tokens", "7", "--json")
    assert code == 0
    rows = json.loads(out)
    model = init_random(build_model(get_preset("tiny_block")), seed=3)
    expected = generate(model, [[1, 2, 3], [4, 5, 6, 7, 8]], GenerationConfig(max_new_tokens=7, seed=3))
    assert [r["prompt_ids"] for r in rows] == [[1, 2, 3], [4, 5, 6, 7, 8]]
    assert [r["token_ids"] for r in rows] == expected.tokens
    assert [r["finish_reason"] for r in rows] == expected.finish_reasons


def test_generate_from_a_checkpoint_equals_the_preset_it_was_saved_from(cli, tmp_path):
    save_checkpoint(init_random(build_model(get_preset("tiny_vanilla")), seed=5), tmp_path / "ckpt")
    args = ("--prompt-ids", "9,8,7", "--max-new-tokens", "5", "--ignore-eos", "--json")
    from_checkpoint = json.loads(cli("generate", "--checkpoint", str(tmp_path / "ckpt"), *args)[1])
    from_preset = json.loads(cli("generate", "--preset", "tiny_vanilla", "--seed", "5", *args)[1])
    assert from_checkpoint == from_preset and len(from_preset[0]["token_ids"]) == 5


def test_generate_prints_readable_lines_without_json(cli):
    code, out, _ = cli("generate", "--preset", "tiny_block", "--prompt-ids", "1,2", "--max-new-tokens", "3",
                       "--ignore-eos")
    assert code == 0
    assert re.search(r"\[0\] prompt:\s+1 2\n\[0\] generated:\s+\d+ \d+ \d+ \(length\)", out)


def test_generate_text_prompt_with_a_tokenizer_returns_ids_and_text(cli, tokenizer_file):
    code, out, _ = cli("generate", "--preset", "tiny_block", "--tokenizer", str(tokenizer_file),
                       "--prompt", "the cat sat on a mat", "--max-new-tokens", "4", "--ignore-eos", "--json")
    assert code == 0
    (row,) = json.loads(out)
    assert row["prompt_ids"] == [1, 2, 3, 4, 5, 6]
    assert len(row["token_ids"]) == 4 and isinstance(row["text"], str)


def test_generate_sampling_flags_reach_the_sampler(cli):
    base = ("generate", "--preset", "tiny_block", "--prompt-ids", "1,2,3", "--max-new-tokens", "8", "--ignore-eos",
            "--json")
    greedy = json.loads(cli(*base)[1])[0]["token_ids"]
    top1 = json.loads(cli(*base, "--temperature", "1.5", "--top-k", "1")[1])[0]["token_ids"]
    sampled = json.loads(cli(*base, "--temperature", "2.0", "--top-p", "0.95", "--seed", "1")[1])[0]["token_ids"]
    assert top1 == greedy and sampled != greedy
    (stopped,) = json.loads(cli(*base, "--stop-token-ids", f"{greedy[2]},511")[1])
    assert stopped["token_ids"] == greedy[: greedy.index(greedy[2]) + 1] and stopped["finish_reason"] == "stop"


def test_generate_pad_token_id_overrides_the_config(cli):
    base = ("generate", "--preset", "tiny_block", "--max-new-tokens", "4", "--ignore-eos", "--json")
    padded = json.loads(cli(*base, "--prompt-ids", "9,9,1,2")[1])[0]["token_ids"]
    assert json.loads(cli(*base, "--prompt-ids", "1,2", "--pad-token-id", "9")[1])[0]["token_ids"] == padded


@pytest.mark.parametrize("args, message", [
    (("--preset", "nope", "--prompt-ids", "1"), "unknown preset 'nope'; known presets: block_main_b4_5"),
    (("--preset", "tiny_block", "--prompt-ids", "1,x"), "--prompt-ids '1,x': 'x' is not an integer token id"),
    (("--preset", "tiny_block", "--prompt-ids", "1,-2"), "token id -2 is negative"),
    (("--preset", "tiny_block", "--prompt-ids", "1,512"), "outside the vocabulary [0, 512): [512]"),
    (("--preset", "tiny_block",), "no prompt: pass --prompt-ids"),
    (("--prompt-ids", "1",), "no model: pass --preset NAME"),
    (("--preset", "tiny_block", "--prompt", "hi"), "--prompt needs --tokenizer"),
    (("--preset", "tiny_block", "--prompt", "hi", "--tokenizer", "/no/such/tokenizer.json"), "--tokenizer /no/such"),
    (("--checkpoint", "/no/such/ckpt", "--prompt-ids", "1"), "no checkpoint at /no/such/ckpt"),
    (("--preset", "tiny_block", "--prompt-ids", "1", "--top-p", "0"), "top_p must be in (0, 1]"),
    (("--preset", "tiny_block", "--prompt-ids", "1", "--pad-token-id", "600"), "pad token id 600 is outside"),
])
def test_generate_bad_input_is_one_line_on_stderr_and_exit_code_2(cli, args, message):
    code, out, err = cli("generate", *args)
    assert code == 2
    *logged, last = err.splitlines()  # log records (when logging is not captured), then the one error line
    assert last.startswith("Error: ") and message in last
    assert all(re.match(r"\d\d:\d\d:\d\d (INFO|WARNING) blockrt", line) for line in logged), logged
    assert "Traceback" not in err and out == ""


def test_installed_blockrt_command_exits_2_for_an_unknown_preset():
    script = Path(sys.executable).parent / "blockrt"
    if not script.exists():
        pytest.skip(f"no installed `blockrt` script next to {sys.executable} (pip install -e . creates it)")
    proc = subprocess.run([str(script), "generate", "--preset", "nope", "--prompt-ids", "1"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert "Error: unknown preset 'nope'" in proc.stderr and "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------------------- demo

def test_demo_runs_every_stage_and_prints_matching_tokens_for_two_ragged_prompts(cli, caplog):
    caplog.set_level(logging.INFO, logger="blockrt.demo")
    code, out, err = cli("demo", "--max-new-tokens", "6")
    assert code == 0, err
    lines = {label: [line for line in out.splitlines() if line.startswith(f"{label}:")]
             for label in ("reference", "onnxruntime")}
    assert len(lines["reference"]) == 2 and all(len(line.split("->")[1].split()) == 6 for line in lines["reference"])
    assert [line.split(":", 1)[1] for line in lines["onnxruntime"]] == [line.split(":", 1)[1] for line in lines["reference"]]
    assert "PASSED" in out  # the verify report
    n = len(STAGES)
    for i, stage in enumerate(STAGES, 1):
        if stage.needs_tensorrt and stage.missing():
            assert f"[{i}/{n}] {stage.name}: skipped, no TensorRT library imports" in caplog.text
        else:
            assert f"[{i}/{n}] {stage.name}..." in caplog.text
    ran = sum(1 for s in STAGES if not s.missing())
    assert f"demo done: {ran} of {n} stages ran" in caplog.text and ran >= n - 1


def test_demo_skips_the_tensorrt_stage_only_when_no_tensorrt_library_imports(caplog, tmp_path, monkeypatch):
    from blockrt.cli import demo

    monkeypatch.setattr(demo, "TENSORRT_MODULES", ("blockrt_no_such_tensorrt",))
    caplog.set_level(logging.INFO, logger="blockrt.demo")
    calls = []
    stages = [Stage("first", lambda d: calls.append("first")),
              Stage("engines", lambda d: calls.append("engines"), needs_tensorrt=True),
              Stage("last", lambda d: calls.append("last"))]
    ran = run_stages(Demo(preset="tiny_block", out_dir=tmp_path, max_new_tokens=2, seed=0), stages)
    assert ran == ["first", "last"] and calls == ["first", "last"]
    assert "[2/3] engines: skipped, no TensorRT library imports (tried blockrt_no_such_tensorrt)" in caplog.text
