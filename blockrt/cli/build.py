"""`blockrt build`: compile an artifact's ONNX graphs to TensorRT engines."""

from __future__ import annotations

import json
from pathlib import Path

import click

from blockrt.backends import TENSORRT_LIBRARIES


@click.command("build")
@click.argument("artifact_dir", metavar="DIR", type=click.Path(path_type=Path))
@click.option("--backend", type=click.Choice(["auto", *TENSORRT_LIBRARIES]), default="auto", show_default=True,
              help="tensorrt: engines for the GPU present (pip install 'blockrt[trt]'); tensorrt-rtx: portable "
              "engines, built even without a GPU (pip install 'blockrt[rtx]'); auto: tensorrt if installed.")
@click.option("--opt-batch", type=int, help="Batch size TensorRT tunes for (default: the export's max batch).")
@click.option("--opt-context", type=int, help="Context tokens TensorRT tunes concat caches for (default: half the max).")
@click.option("--timing-cache", type=click.Path(path_type=Path),
              help="Timing cache file to reuse and update (default: DIR/timing.cache).")
@click.option("--json", "as_json", is_flag=True, help="Print the engines recorded in the manifest as JSON.")
def command(artifact_dir, backend, opt_batch, opt_context, timing_cache, as_json) -> None:
    """Build one TensorRT engine per graph of an exported artifact DIR.

    Every shape within the export's limits (batch, context) runs; --opt-batch and --opt-context
    pick the shapes the kernels are tuned for. Engines are written as DIR/<graph>.engine and
    recorded in DIR/manifest.json with the TensorRT library, its version and the target GPU; a
    runtime refuses engines from another library version or GPU. Rebuild after upgrading TensorRT
    or moving to another GPU.

    \b
    Examples:
      blockrt build artifacts/tiny
      blockrt build artifacts/b85 --backend tensorrt --opt-batch 32 --opt-context 1024
      blockrt -v build artifacts/tiny --backend tensorrt-rtx --json
    """
    from blockrt.runtime.build import build_engines

    manifest = build_engines(artifact_dir, backend=backend, opt_batch=opt_batch, opt_context=opt_context,
                             timing_cache=timing_cache)
    if as_json:
        click.echo(json.dumps({k: e.to_dict() for k, e in manifest.engines.items()}, indent=2))
        return
    for e in manifest.engines.values():
        click.echo(f"built {artifact_dir / e.file.path} ({e.library} {e.library_version}, {e.device})")
