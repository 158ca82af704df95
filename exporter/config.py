"""Model configurations: one dataclass per model kind, plus (de)serialisation for manifests.

A `NeoXConfig` describes one GPT-NeoX (Pythia) stack. A `BlockConfig` joins the lookup embedder,
the block decoder and the token decoder; a `VanillaConfig` is a plain Pythia language model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Union

import torch

# artifact dtype names -> torch dtypes (the one table; everything else imports it)
TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def default_head_dim(hidden_size: int) -> int:
    """Head size rule of the official configs: 32 up to h=256, 64 up to h=1536, else 128."""
    if hidden_size <= 256:
        return 32
    if hidden_size <= 1536:
        return 64
    return 128


@dataclass(frozen=True)
class NeoXConfig:
    """One GPT-NeoX stack (parallel residual, partial rotary, fused per-head QKV)."""

    num_layers: int
    hidden_size: int
    vocab_size: int
    num_heads: int = 0  # 0: derived from the head size rule
    intermediate_size: int = 0  # 0: 4 * hidden_size
    rotary_pct: float = 0.25
    rotary_base: float = 10000.0
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.num_heads == 0:
            object.__setattr__(self, "num_heads", self.hidden_size // default_head_dim(self.hidden_size))
        if self.intermediate_size == 0:
            object.__setattr__(self, "intermediate_size", 4 * self.hidden_size)
        if self.num_layers < 1 or self.hidden_size < 1 or self.vocab_size < 1:
            raise ValueError(f"invalid stack config {self}: layers, hidden size and vocab must be >= 1")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden size {self.hidden_size} is not divisible by {self.num_heads} heads")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.rotary_pct)

    def layer_params(self) -> int:
        h, i = self.hidden_size, self.intermediate_size
        attn = h * 3 * h + 3 * h + h * h + h
        mlp = h * i + i + i * h + h
        return attn + mlp + 4 * h  # two LayerNorms

    def non_embedding_params(self) -> int:
        return self.num_layers * self.layer_params() + 2 * self.hidden_size  # + final LayerNorm


@dataclass(frozen=True)
class BlockConfig:
    """Block Transformer: lookup embedder (concat) + block decoder + prefix token decoder."""

    block_decoder: NeoXConfig
    token_decoder: NeoXConfig
    block_len: int = 4
    eos_token_id: int = 0
    pad_token_id: int = 0
    kind: str = "block"

    def __post_init__(self) -> None:
        if self.block_decoder.hidden_size % self.block_len:
            raise ValueError(
                f"block decoder hidden size {self.block_decoder.hidden_size} is not divisible by "
                f"block length {self.block_len}"
            )

    @property
    def vocab_size(self) -> int:
        return self.token_decoder.vocab_size

    @property
    def embed_dim(self) -> int:
        """Width of one token's lookup embedding (h_e = h_block / L)."""
        return self.block_decoder.hidden_size // self.block_len

    def non_embedding_params(self) -> int:
        hb, ht = self.block_decoder.hidden_size, self.token_decoder.hidden_size
        expansion = hb * 2 * ht + 2 * ht
        return self.block_decoder.non_embedding_params() + self.token_decoder.non_embedding_params() + expansion

    def params(self) -> int:
        """Parameters used at inference (the unused block-decoder `embed_in` is not counted)."""
        v = self.vocab_size
        return self.non_embedding_params() + v * self.embed_dim + 2 * v * self.token_decoder.hidden_size


@dataclass(frozen=True)
class VanillaConfig:
    """Plain GPT-NeoX (Pythia) causal language model, the baseline."""

    decoder: NeoXConfig
    eos_token_id: int = 0
    pad_token_id: int = 0
    kind: str = "vanilla"
    block_len: int = 1

    @property
    def vocab_size(self) -> int:
        return self.decoder.vocab_size

    def non_embedding_params(self) -> int:
        return self.decoder.non_embedding_params()

    def params(self) -> int:
        return self.non_embedding_params() + 2 * self.vocab_size * self.decoder.hidden_size


ModelConfig = Union[BlockConfig, VanillaConfig]


def config_to_dict(config: ModelConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def config_from_dict(data: dict[str, Any]) -> ModelConfig:
    """Inverse of `config_to_dict`; raises ValueError naming what is wrong."""
    try:
        kind = data["kind"]
        if kind == "block":
            return BlockConfig(
                block_decoder=NeoXConfig(**data["block_decoder"]),
                token_decoder=NeoXConfig(**data["token_decoder"]),
                **{k: data[k] for k in ("block_len", "eos_token_id", "pad_token_id") if k in data},
            )
        if kind == "vanilla":
            return VanillaConfig(
                decoder=NeoXConfig(**data["decoder"]),
                **{k: data[k] for k in ("eos_token_id", "pad_token_id") if k in data},
            )
    except (KeyError, TypeError) as e:
        raise ValueError(f"malformed model config ({e}): {data}") from None
    raise ValueError(f"unknown model kind {data.get('kind')!r}: expected 'block' or 'vanilla'")
