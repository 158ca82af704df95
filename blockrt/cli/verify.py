"""`blockrt verify`: check an artifact's graphs and engines against the PyTorch reference."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from blockrt.backends import GRAPH_BACKENDS


@click.command("verify")
@click.argument("artifact_dir", metavar="DIR", type=click.Path(path_type=Path))
@click.option("--backend", type=click.Choice([*GRAPH_BACKENDS, "all"]), default="onnxruntime",
              show_default=True, help="What runs the graphs: ONNX Runtime (CPU), the TensorRT engines of "
              "`blockrt build` (needs a GPU), or both.")
@click.option("--gen-tokens", default=128, show_default=True, type=int,
              help="Greedy tokens generated per prompt and compared with the reference.")
@click.option("--checkpoint", type=click.Path(path_type=Path),
              help="Compare against this checkpoint instead of the artifact's own weights.safetensors.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def command(artifact_dir, backend, gen_tokens, checkpoint, as_json) -> None:
    """Check that an artifact DIR computes what the PyTorch reference computes.

    Checks every file's SHA-256 and every graph (ONNX checker, shape inference, allowed ops, I/O
    against the manifest), then runs each graph step by step beside the fp32 reference on the
    same inputs (ragged prefill with prompts that are not a multiple of the block length, token
    steps, decode) and reports max abs and relative error per output; finally generates greedily
    for several prompts through the runtime and compares every token. Limits: relative error
    below 1e-4 (fp32), 2e-2 (fp16), 5e-2 (bf16); tokens must match except in bf16. Backends that
    cannot run here are listed as skipped with the reason. Exit code 1 when a check fails (a file
    whose SHA-256 differs from the manifest is a failed check: a changed graph or weights file stops
    the run there) or no backend could run; 2 when DIR is not a usable artifact (no manifest, or
    one that was edited or is malformed).

    \b
    Examples:
      blockrt verify artifacts/tiny
      blockrt verify artifacts/tiny --backend all --gen-tokens 256
      blockrt verify artifacts/main --checkpoint ckpt/model.safetensors --json
    """
    from blockrt.runtime.verify import verify

    backends = GRAPH_BACKENDS if backend == "all" else (backend,)
    report = verify(artifact_dir, backends=backends, gen_tokens=gen_tokens, checkpoint=checkpoint)
    click.echo(json.dumps(report.to_dict(), indent=2) if as_json else report.format_table())
    if not report.passed:
        sys.exit(1)
