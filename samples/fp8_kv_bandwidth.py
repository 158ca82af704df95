"""Does the FP8 KV decode step read the cache at the memory bandwidth? Times
`blockrt.runtime.fp8_kv.fp8_kv_decode` (one new row per sequence and head: quantized, written into
the FP8 cache, and attended to with the older rows) against PyTorch's SDPA over a bf16 cache of
the same shape, on the block decoder's shapes of block_main_b4_1.2b (16 heads of 128), and prints
the bytes each reads per second next to a device-to-device copy. Needs a CUDA GPU and Triton.

    python samples/fp8_kv_bandwidth.py --batch 2048 --rows 160
"""

from __future__ import annotations

import argparse

import torch
import triton.testing

from blockrt.runtime.fp8_kv import fp8_kv_decode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--rows", type=int, default=160, help="cached rows (blocks) each sequence attends to")
    parser.add_argument("--head-dim", type=int, default=128)
    args = parser.parse_args()
    B, H, S, D = args.batch, args.heads, args.rows, args.head_dim
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(B, H, 1, D, generator=gen, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(B, H, S, D, generator=gen, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    k8, v8 = k.to(torch.float8_e4m3fn), v.to(torch.float8_e4m3fn)
    new_k, new_v = k[:, :, -1:].clone(), v[:, :, -1:].clone()  # the step's new row: the last of each sequence
    last = torch.full((B,), S - 1, dtype=torch.long, device="cuda")
    scale = D ** -0.5

    cos, sin = torch.ones(B, 1, 1, D // 4, device="cuda"), torch.zeros(B, 1, 1, D // 4, device="cuda")  # rotary off

    def fp8_step():
        return fp8_kv_decode(q, new_k, new_v, cos, sin, k8, v8, last, S, 1.0, 1.0, scale)

    fp8 = fp8_step()  # also autotunes the tile size
    ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k8.float(), v8.float(), scale=scale)
    rel = float((fp8.float() - ref).norm() / ref.norm())
    copy_src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    copy_dst = torch.empty_like(copy_src)
    runs = {
        "device copy (1 GiB read + write)": (lambda: copy_dst.copy_(copy_src), 2 << 30),
        "fp8 fp8_kv_decode (Triton)": (fp8_step, 2 * B * H * S * D),
        "bf16 SDPA": (lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale), 4 * B * H * S * D),
    }
    print(f"batch {B}, heads {H}, rows {S}, head_dim {D}; fp8 kernel vs fp32 reference: rel error {rel:.1e}")
    print("| kernel | bytes read | median ms | GB/s |")
    print("|---|---|---|---|")
    for name, (fn, nbytes) in runs.items():
        ms = triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")
        print(f"| {name} | {nbytes / 1e9:.2f} GB | {ms:.3f} | {nbytes / ms / 1e6:,.0f} |")


if __name__ == "__main__":
    main()
