"""The PyTorch reference: GPT-NeoX stacks, the Block Transformer and the vanilla Pythia model.

Module names mirror the official checkpoint keys (docs/model.md), so `state_dict()` is the
checkpoint layout. Every stack forward takes embeddings, positions, an optional attention mask and
an optional KV cache (see `cache.py`); the step functions (`block_step`, `token_step`,
`decoder_step`) are what the exported graphs and the runtime compute.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .cache import ConcatCache, ScatterCache
from .config import BlockConfig, NeoXConfig, VanillaConfig

Cache = ScatterCache | ConcatCache


def rotary_cos_sin(positions: torch.Tensor, rotary_dim: int, base: float, dtype: torch.dtype):
    """cos/sin tables `[B, 1, T, rotary_dim]` for integer positions `[B, T]` (computed in fp32)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, device=positions.device, dtype=torch.float32) / rotary_dim))
    freqs = positions.to(torch.float32)[..., None] * inv_freq  # [B, T, rotary_dim / 2]
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # [B, 1, T, rotary_dim]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half rotary embedding on the first `rotary_dim` channels of each head."""
    rd = cos.shape[-1]
    x_rot, x_pass = x[..., :rd], x[..., rd:]
    x1, x2 = x_rot[..., : rd // 2], x_rot[..., rd // 2:]
    rotated = torch.cat([-x2, x1], dim=-1)
    return torch.cat([x_rot * cos + rotated * sin, x_pass], dim=-1)


def matmul_attention(q, k, v, mask, scale: float):
    """Attention as two batched matmuls. For a handful of keys (the token decoder's L + 1) this is
    far faster than fused kernels, which tile for long sequences. mask: bool [B, 1, T, S]."""
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale  # [B, H, T, S], fp32 like fused kernels
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(scores.softmax(dim=-1).to(v.dtype), v)


class Attention(nn.Module):
    decode_math = False  # set by the PyTorch engine on the token decoder: attention over its few cached rows
    kv_quant = None  # set by the PyTorch engine for an FP8 KV cache: stores k/v quantized and attends
    small_cache_kernel = None  # set by the PyTorch engine on CUDA with decode_math: rotary, the cache write and
    # the attention over the few cached rows in one kernel (blockrt.runtime.small_attention; eager and compiled)

    def __init__(self, cfg: NeoXConfig):
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.query_key_value = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x, cos, sin, mask, cache: Cache | None, layer: int, last_only: bool = False):
        """-> [B, T, C], or [B, 1, C] for the last position only with `last_only` (the keys and
        values of every position are still cached)."""
        B, T, C = x.shape
        # fused QKV is laid out per head: [B, T, H, 3 * D], not [B, T, 3, H, D]
        qkv = self.query_key_value(x).view(B, T, self.num_heads, 3 * self.head_dim)
        scale = 1.0 / math.sqrt(self.head_dim)
        if self.small_cache_kernel is not None and self._small_cache_step(T, cache, mask):
            keys, values = cache.keys[layer], cache.values[layer]
            y = self.small_cache_kernel(qkv, cos, sin, keys, values, cache.write_index, scale)  # [B, T, H, D]
        else:
            q, k, v = qkv.transpose(1, 2).split(self.head_dim, dim=-1)  # each [B, H, T, D]
            if self.kv_quant is not None:  # an FP8 KV cache (PyTorch engine: blockrt.runtime.fp8_kv), rotary included
                y = self.kv_quant(q, k, v, cos, sin, mask, cache, layer, scale)
            else:
                q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
                if cache is not None:
                    k, v = cache.update(layer, k, v)  # [B, H, S, D]
                y = self.attend(q, k, v, mask, scale)
            y = y.transpose(1, 2)  # [B, T, H, D]
        if last_only:
            y, T = y[:, -1:], 1
        return self.dense(y.reshape(B, T, C))

    def _small_cache_step(self, new: int, cache, mask) -> bool:
        """Whether this step's attention is what `small_cache_kernel` computes: 1 or 2 new rows over
        an in-place cache of at most 16, each query attending to every row up to its own."""
        return (self.kv_quant is None and mask is not None and new <= 2 and isinstance(cache, ScatterCache)
                and cache.inplace and cache.attend_len is None and cache.keys[0].shape[2] <= 16)

    def attend(self, q, k, v, mask, scale: float):
        compiling = torch.compiler.is_compiling() and not torch.compiler.is_exporting()  # torch.compile, not ONNX export
        if self.decode_math and mask is not None and k.shape[-2] <= 16:
            return matmul_attention(q, k, v, mask, scale)
        if compiling and mask is not None and q.dtype == torch.float32:
            # fp32 (exactness checks) with a mask leaves SDPA only its memory-efficient kernel; plain
            # matmuls keep the compiled fp32 path on kernels the bf16 path also uses
            return matmul_attention(q, k, v, mask, scale)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale)


class MLP(nn.Module):
    gelu_epilogue = False  # set by the PyTorch engine on CUDA in bf16 / fp16: see forward

    def __init__(self, cfg: NeoXConfig):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.dense_4h_to_h = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x):
        if self.gelu_epilogue:
            # bias and GELU in the GEMM's cuBLASLt epilogue (one kernel instead of a GEMM and an
            # element-wise pass over [rows, 4h]); its GELU is the tanh form, within 5e-4 of the exact
            # one, where bf16 rounding alone moves a value by up to 8e-3
            up = self.dense_h_to_4h
            h = torch._addmm_activation(up.bias, x.reshape(-1, x.shape[-1]), up.weight.t(), use_gelu=True)
            return self.dense_4h_to_h(h.view(*x.shape[:-1], h.shape[-1]))
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x)))  # exact (erf) GELU


class NeoXLayer(nn.Module):
    def __init__(self, cfg: NeoXConfig):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.attention = Attention(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache, layer, last_only: bool = False):
        attn = self.attention(self.input_layernorm(x), cos, sin, mask, cache, layer, last_only)
        if last_only:
            x = x[:, -1:]
        mlp = self.mlp(self.post_attention_layernorm(x))
        return mlp + attn + x  # parallel residual


class NeoXModel(nn.Module):
    """`gpt_neox`: optional token embedding, the layers and the final LayerNorm."""

    def __init__(self, cfg: NeoXConfig, with_embedding: bool = True):
        super().__init__()
        self.config = cfg
        if with_embedding:
            self.embed_in = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(NeoXLayer(cfg) for _ in range(cfg.num_layers))
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x, positions, mask=None, cache: Cache | None = None, last_only: bool = False):
        """x: [B, T, h] embeddings, positions: [B, T] -> [B, T, h] after the final LayerNorm.
        `last_only`: only the last position's output is wanted -> [B, 1, h]; the last layer then
        computes the other positions' keys and values (for the cache) and nothing else for them
        (its attention output projection and MLP run on one position instead of T)."""
        cos, sin = rotary_cos_sin(positions, self.config.rotary_dim, self.config.rotary_base, x.dtype)
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, mask, cache, i, last_only and i == last)
        return self.final_layer_norm(x)


def _last_valid(h: torch.Tensor, new_len: torch.Tensor) -> torch.Tensor:
    """h [B, T, C] -> [B, C] at row new_len[b] - 1 of each sequence."""
    index = (new_len - 1).clamp(min=0)[:, None, None].expand(-1, 1, h.shape[-1])
    return h.gather(1, index)[:, 0]


def _positions(past_len: torch.Tensor, num_new: int) -> torch.Tensor:
    return past_len[:, None] + torch.arange(num_new, device=past_len.device)[None, :]  # [B, T]


def token_positions(slots: torch.Tensor, positions: str = "forward") -> torch.Tensor:
    """Rotary positions of token-decoder inputs at local slots [prefix0, prefix1, t1 .. t_{L-1}] =
    0 .. L. "forward" (training, the default): the slot itself. "official-generate": 0, 0, 1 .. L-1,
    what the official generate() gives: its token decoder runs through Hugging Face generate,
    whose GPT-NeoX `prepare_inputs_for_generation` derives positions from the attention mask of
    the token ids alone (cumsum - 1), so both prefix vectors of the first step share position 0
    and token k sits at k instead of k + 1."""
    if positions == "forward":
        return slots
    if positions == "official-generate":
        return (slots - 1).clamp(min=0)
    raise ValueError(f"unknown positions {positions!r}: expected 'forward' or 'official-generate'")


class LookupEmbedder(nn.Module):
    """L token embeddings of width h_block / L, concatenated into one block embedding."""

    def __init__(self, cfg: BlockConfig):
        super().__init__()
        self.block_len = cfg.block_len
        self.embeddings = nn.Embedding(cfg.vocab_size, cfg.embed_dim)

    def forward(self, input_ids):  # [B, N * L] -> [B, N, L * h_e]
        B, T = input_ids.shape
        return self.embeddings(input_ids).view(B, T // self.block_len, -1)


class BlockDecoder(nn.Module):
    def __init__(self, cfg: BlockConfig):
        super().__init__()
        self.gpt_neox = NeoXModel(cfg.block_decoder, with_embedding=False)


class TokenDecoder(nn.Module):
    def __init__(self, cfg: BlockConfig):
        super().__init__()
        t = cfg.token_decoder
        self.hidden_size = t.hidden_size
        self.gpt_neox = NeoXModel(t)
        self.embed_out = nn.Linear(t.hidden_size, t.vocab_size, bias=False)
        self.expansion_layer = nn.Conv1d(cfg.block_decoder.hidden_size, 2 * t.hidden_size, kernel_size=1)

    def prefix(self, context):  # [B, N, h_block] -> [B, N, 2, h_tok]
        B, N, _ = context.shape
        conv = self.expansion_layer  # a kernel-size-1 Conv1d is a Linear over the channels
        out = F.linear(context, conv.weight[:, :, 0], conv.bias)  # [B, N, 2*h_tok]
        return out.view(B, N, 2, self.hidden_size)  # channels [0:h_tok] are prefix 0

    def embed(self, input_ids, prefix, past_len):
        """Token-decoder inputs at local positions past_len + j: the prefix vectors at 0 and 1,
        token embeddings after. input_ids [B, T], prefix [B, 2, h] -> [B, T, h]."""
        positions = _positions(past_len, input_ids.shape[1])
        tokens = self.gpt_neox.embed_in(input_ids)
        index = positions.clamp(max=1)[..., None].expand(-1, -1, self.hidden_size)
        return torch.where((positions < 2)[..., None], prefix.gather(1, index), tokens), positions


class BlockTransformer(nn.Module):
    def __init__(self, cfg: BlockConfig):
        super().__init__()
        self.config = cfg
        self.embedder = LookupEmbedder(cfg)
        self.block_decoder = BlockDecoder(cfg)
        self.token_decoder = TokenDecoder(cfg)

    def forward(self, input_ids, positions: str = "forward"):
        """Teacher forcing. input_ids [B, N*L] -> logits [B, N-1, L, V]: row [j, k] predicts token k
        of block j+1 from blocks 0..j and tokens 0..k-1 of block j+1. `positions`: the token
        decoder's rotary positions (`token_positions`)."""
        L = self.config.block_len
        B, T = input_ids.shape
        N = T // L
        block_positions = torch.arange(N, device=input_ids.device).expand(B, N)
        context = self.block_decoder.gpt_neox(self.embedder(input_ids), block_positions)  # [B, N, h_block]
        prefix = self.token_decoder.prefix(context[:, :-1])  # [B, N-1, 2, h_tok]
        targets = input_ids.view(B, N, L)[:, 1:, : L - 1]  # tokens fed after the prefix
        tokens = self.token_decoder.gpt_neox.embed_in(targets)  # [B, N-1, L-1, h_tok]
        x = torch.cat([prefix, tokens], dim=2).flatten(0, 1)  # [B*(N-1), L+1, h_tok]
        local = token_positions(torch.arange(L + 1, device=input_ids.device), positions).expand(x.shape[0], L + 1)
        h = self.token_decoder.gpt_neox(x, local)
        logits = self.token_decoder.embed_out(h[:, 1:])  # positions 1..L predict tokens 0..L-1
        return logits.view(B, N - 1, L, -1)

    def block_step(self, input_ids, past_len, new_len, cache: Cache, mask):
        """New blocks of each sequence -> token-decoder prefix [B, 2, h_tok] of the last valid one.
        input_ids [B, N*L]; past_len [B] blocks already cached; new_len [B] valid new blocks."""
        x = self.embedder(input_ids)
        h = self.block_decoder.gpt_neox(x, _positions(past_len, x.shape[1]), mask, cache)
        return self.token_decoder.prefix(_last_valid(h, new_len)[:, None])[:, 0]

    def token_step(self, input_ids, prefix, past_len, cache: Cache, mask, positions: str = "forward"):
        """Local step -> logits [B, V] of the next token. input_ids [B, T] (ignored at slots 0 and
        1, which take the prefix), past_len [B] local slots already cached; `positions`: the
        rotary positions of those slots (`token_positions`)."""
        x, slots = self.token_decoder.embed(input_ids, prefix, past_len)
        h = self.token_decoder.gpt_neox(x, token_positions(slots, positions), mask, cache, last_only=True)
        return self.token_decoder.embed_out(h[:, -1])


class GPTNeoXLM(nn.Module):
    """Vanilla Pythia model (`gpt_neox.*`, `embed_out.weight`)."""

    def __init__(self, cfg: VanillaConfig):
        super().__init__()
        self.config = cfg
        self.gpt_neox = NeoXModel(cfg.decoder)
        self.embed_out = nn.Linear(cfg.decoder.hidden_size, cfg.vocab_size, bias=False)

    def forward(self, input_ids):  # [B, T] -> [B, T, V]
        B, T = input_ids.shape
        positions = torch.arange(T, device=input_ids.device).expand(B, T)
        return self.embed_out(self.gpt_neox(self.gpt_neox.embed_in(input_ids), positions))

    def decoder_step(self, input_ids, past_len, new_len, cache: Cache, mask):
        """input_ids [B, T]; past_len [B] tokens already cached; new_len [B] valid new tokens
        -> logits [B, V] at each sequence's last valid token."""
        x = self.gpt_neox.embed_in(input_ids)
        h = self.gpt_neox(x, _positions(past_len, input_ids.shape[1]), mask, cache)
        return self.embed_out(_last_valid(h, new_len))


def build_model(config: BlockConfig | VanillaConfig) -> BlockTransformer | GPTNeoXLM:
    return BlockTransformer(config) if isinstance(config, BlockConfig) else GPTNeoXLM(config)


def init_random(model: nn.Module, seed: int = 0, std: float = 0.02) -> nn.Module:
    """Deterministic random weights (normal(0, std) matrices and embeddings, unit LayerNorms,
    small biases): the stand-in for trained checkpoints, which we cannot download."""
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name or "layer_norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen, device=device) if name.endswith("weight")
                        else 0.1 * torch.randn(p.shape, generator=gen, device=device))
            elif name.endswith("bias"):
                p.copy_(0.02 * torch.randn(p.shape, generator=gen, device=device))
            else:
                p.copy_(std * torch.randn(p.shape, generator=gen, device=device))
    return model
