"""Named model presets: the published Block Transformer and Pythia shapes, and tiny test models."""

from __future__ import annotations

from blockrt.errors import UserError

from .config import BlockConfig, ModelConfig, NeoXConfig, VanillaConfig

PYTHIA_VOCAB = 50304  # GPT-NeoX-20B BPE, embedding rows padded to a multiple of 128
TINY_VOCAB = 512


def _block(layers: int, hidden: int, vocab: int = PYTHIA_VOCAB, token_layers: int | None = None,
           token_hidden: int | None = None) -> BlockConfig:
    return BlockConfig(
        block_decoder=NeoXConfig(num_layers=layers, hidden_size=hidden, vocab_size=vocab),
        token_decoder=NeoXConfig(num_layers=token_layers or layers, hidden_size=token_hidden or hidden,
                                 vocab_size=vocab),
    )


def _vanilla(layers: int, hidden: int, vocab: int = PYTHIA_VOCAB) -> VanillaConfig:
    return VanillaConfig(decoder=NeoXConfig(num_layers=layers, hidden_size=hidden, vocab_size=vocab))


PRESETS: dict[str, ModelConfig] = {
    "block_main_b4_5": _block(3, 256),
    "block_main_b4_19": _block(3, 512),
    "block_main_b4_85": _block(6, 768),
    "block_main_b4_300": _block(12, 1024),
    "block_main_b4_800": _block(8, 2048),
    "block_main_b4_1.2b": _block(12, 2048),
    "vanilla_70": _vanilla(6, 512),
    "vanilla_160": _vanilla(12, 768),
    "vanilla_410": _vanilla(24, 1024),
    # Tiny models for tests and the demo: seconds to export and build on a CPU.
    "tiny_block": _block(2, 64, vocab=TINY_VOCAB),
    "tiny_block_wide": _block(2, 128, vocab=TINY_VOCAB, token_layers=3, token_hidden=64),
    "tiny_vanilla": _vanilla(2, 64, vocab=TINY_VOCAB),
}

TINY_PRESETS = [name for name in PRESETS if name.startswith("tiny_")]


def get_preset(name: str) -> ModelConfig:
    """The config of a named preset; an unknown name is a UserError listing the known ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise UserError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}") from None


def preset_summary(name: str) -> dict:
    """One row of `blockrt presets`: shapes and parameter counts of a preset."""
    cfg = get_preset(name)
    row = {"name": name, "kind": cfg.kind, "vocab_size": cfg.vocab_size, "params": cfg.params(),
           "non_embedding_params": cfg.non_embedding_params()}
    if isinstance(cfg, BlockConfig):
        b, t = cfg.block_decoder, cfg.token_decoder
        row.update(block_len=cfg.block_len, embed_dim=cfg.embed_dim,
                   block_decoder=f"{b.num_layers} x {b.hidden_size}", token_decoder=f"{t.num_layers} x {t.hidden_size}")
    else:
        d = cfg.decoder
        row.update(block_len=1, decoder=f"{d.num_layers} x {d.hidden_size}")
    return row
