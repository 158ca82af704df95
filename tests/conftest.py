"""Shared fixtures. Keep them small; add new ones at the end."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

# Limits of the shared tiny artifacts: room for the default verify prompts (up to 16 tokens once
# padded to a block) plus 128 generated tokens, and ragged batches of up to 4 rows.
TEST_MAX_BATCH = 4
TEST_MAX_CONTEXT = 160


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """exported(preset, cache_io="inplace", dtype="fp32") -> artifact directory, exported once per
    session (random weights, seed 0). Shared: tests that change files must use `artifact_copy`."""
    from blockrt.exporter.export import export

    done: dict[tuple, Path] = {}

    def get(preset: str, cache_io: str = "inplace", dtype: str = "fp32") -> Path:
        key = (preset, cache_io, dtype)
        if key not in done:
            out = tmp_path_factory.mktemp("artifacts") / f"{preset}-{cache_io}-{dtype}"
            export(preset, out, dtype=dtype, cache_io=cache_io, max_batch=TEST_MAX_BATCH,
                   max_context=TEST_MAX_CONTEXT, seed=0)
            done[key] = out
        return done[key]

    return get


@pytest.fixture
def artifact_copy(exported, tmp_path):
    """artifact_copy(preset, cache_io="inplace", dtype="fp32") -> a private copy of a shared artifact."""

    def get(preset: str, cache_io: str = "inplace", dtype: str = "fp32") -> Path:
        dst = tmp_path / f"{preset}-{cache_io}-{dtype}"
        shutil.copytree(exported(preset, cache_io, dtype), dst)
        return dst

    return get


@pytest.fixture
def blockrt_cli(monkeypatch, capsys):
    """blockrt_cli(*args) -> (exit code, stdout, stderr) of `blockrt ARGS`, run in this process
    through the real entry point."""
    import sys

    from blockrt.cli import main

    def run(*args: str) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["blockrt", *args])
        try:
            main()
            code = 0
        except SystemExit as e:
            code = e.code
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


@pytest.fixture(scope="session")
def bpe_tokenizer_file(tmp_path_factory) -> Path:
    """A real tokenizer.json: a byte-level BPE trained here with the `tokenizers` library on a small
    corpus, 300 ids (inside the tiny presets' vocabulary of 512), id 0 = <|endoftext|> (EOS)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = ["the cat sat on the mat", "a dog ran after the cat", "block transformers decode blocks of tokens",
              "the quick brown fox jumps over the lazy dog"] * 20
    tok.train_from_iterator(corpus, trainer)
    path = tmp_path_factory.mktemp("bpe") / "tokenizer.json"
    tok.save(str(path))
    return path
