"""The graph contract: names, dtypes and shapes of every input and output of every exported graph.

The exporter builds graphs to this contract and the runtime binds buffers by it, so neither side
guesses. Shapes use strings for dynamic axes ("batch", "new_tokens", "past") and integers for
static ones.

Graphs of a block model: `block_decoder` and `token_decoder`; of a vanilla model: `decoder`.

block_decoder  input_ids [batch, new_tokens] int64    tokens of N new blocks (N * L), right-padded
               past_len [batch] int64                 blocks already cached = write index
               new_len [batch] int64                  valid new blocks per sequence
               past_key_values.{i}.key/value          [batch, heads, cache_len, head_dim]
               (concat only) attention_mask [batch, past + new_tokens / L] int64, 1 = valid row
           ->  prefix_embeds [batch, 2, h_tok]        token-decoder prefix of the last valid block
               present.{i}.key/value                  updated caches
token_decoder  input_ids [batch, new_tokens] int64    previous token (positions 0, 1 take the prefix)
               prefix_embeds [batch, 2, h_tok]
               past_len [batch] int64                 local positions already cached (0 .. L)
               past_key_values.{i}.key/value          [batch, heads, L + 1, head_dim]
           ->  logits [batch, vocab] float32          next-token logits
               present.{i}.key/value
decoder        as block_decoder with tokens for blocks, and `logits` instead of `prefix_embeds`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

CACHE_IO_MODES = ("inplace", "concat")
DTYPES = ("fp32", "fp16", "bf16")
ONNX_DTYPE_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
OPSET = 24
KV_CACHE_TYPES = {"fp8": "float8e4m3fn"}  # --kv-cache-dtype -> cache tensor dtype

BLOCK_GRAPHS = ("block_decoder", "token_decoder")
VANILLA_GRAPHS = ("decoder",)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy-style name: int64, float32, float16, bfloat16
    shape: tuple  # ints for static axes, strings for dynamic ones

    def to_dict(self) -> dict:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TensorSpec":
        return cls(d["name"], d["dtype"], tuple(d["shape"]))

    @property
    def dynamic_axes(self) -> dict[int, str]:
        return {i: s for i, s in enumerate(self.shape) if isinstance(s, str)}


def past_name(layer: int, which: str) -> str:
    return f"past_key_values.{layer}.{which}"


def present_name(layer: int, which: str) -> str:
    return f"present.{layer}.{which}"


def cache_specs(num_layers: int, heads: int, length, head_dim: int, dtype: str, present: bool) -> list[TensorSpec]:
    name = present_name if present else past_name
    return [TensorSpec(name(i, w), dtype, ("batch", heads, length, head_dim))
            for i in range(num_layers) for w in ("key", "value")]


def graph_names(kind: str) -> tuple[str, ...]:
    return BLOCK_GRAPHS if kind == "block" else VANILLA_GRAPHS


def graph_io(config, graph: str, cache_io: str, dtype: str, cache_len: int,
             kv_cache_dtype: str | None = None) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """(inputs, outputs) of `graph` for a model config. `cache_len` is the static cache length of
    an in-place graph (blocks for block_decoder, tokens for decoder; token_decoder uses L + 1).
    `kv_cache_dtype="fp8"`: the block decoder's (decoder's) caches are float8e4m3fn; the token
    decoder's few rows stay in `dtype`."""
    if cache_io not in CACHE_IO_MODES:
        raise ValueError(f"unknown cache I/O mode {cache_io!r}: expected one of {', '.join(CACHE_IO_MODES)}")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    t = ONNX_DTYPE_NAMES[dtype]
    i64 = "int64"
    concat = cache_io == "concat"
    if graph == "token_decoder":
        stack = config.token_decoder
        length = "past" if concat else config.block_len + 1
        prefix = TensorSpec("prefix_embeds", t, ("batch", 2, stack.hidden_size))
        inputs = [TensorSpec("input_ids", i64, ("batch", "new_tokens")), prefix,
                  TensorSpec("past_len", i64, ("batch",))]
        outputs = [TensorSpec("logits", "float32", ("batch", stack.vocab_size))]
    elif graph in ("block_decoder", "decoder"):
        stack = config.block_decoder if graph == "block_decoder" else config.decoder
        length = "past" if concat else cache_len
        inputs = [TensorSpec("input_ids", i64, ("batch", "new_tokens")), TensorSpec("past_len", i64, ("batch",)),
                  TensorSpec("new_len", i64, ("batch",))]
        if graph == "block_decoder":
            outputs = [TensorSpec("prefix_embeds", t, ("batch", 2, config.token_decoder.hidden_size))]
        else:
            outputs = [TensorSpec("logits", "float32", ("batch", stack.vocab_size))]
    else:
        raise ValueError(f"unknown graph {graph!r}: expected one of {BLOCK_GRAPHS + VANILLA_GRAPHS}")
    kv = KV_CACHE_TYPES[kv_cache_dtype] if kv_cache_dtype is not None and graph != "token_decoder" else t
    inputs += cache_specs(stack.num_layers, stack.num_heads, length, stack.head_dim, kv, present=False)
    if concat and graph != "token_decoder":
        inputs.append(TensorSpec("attention_mask", i64, ("batch", "total")))
    present_len = "total" if concat else length
    outputs += cache_specs(stack.num_layers, stack.num_heads, present_len, stack.head_dim, kv, present=True)
    return inputs, outputs
