"""`blockrt serve`: serve an artifact over an OpenAI-compatible HTTP API (FastAPI + uvicorn). Also
holds the flags and model loading that `blockrt triton` shares (`server_options`, `load_model`)."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from blockrt.backends import BACKEND_CHOICES
from blockrt.errors import require

log = logging.getLogger("blockrt.serve")


def server_options(f):
    """The artifact argument and the model/queue flags of the serving verbs."""
    options = [
        click.argument("artifact", metavar="DIR", type=click.Path(exists=True, file_okay=False, path_type=Path)),
        click.option("--backend", type=click.Choice(BACKEND_CHOICES), default="auto",
                     show_default=True, help="auto: tensorrt if engines were built and a GPU is present, torch on a "
                     "GPU, else onnxruntime."),
        click.option("--device", default=None, help="cpu or cuda[:N] (default: cuda for tensorrt/torch when present)."),
        click.option("--max-batch", type=click.IntRange(1), default=None,
                     help="Sequences generated at once (default and limit: the artifact's max batch)."),
        click.option("--max-queue", type=click.IntRange(1), default=256, show_default=True,
                     help="Requests allowed to wait for a batch row; beyond it new requests are refused "
                     "(HTTP 429 with Retry-After; Triton: an error response)."),
        click.option("--compile/--no-compile", "compile_steps", default=False, show_default=True,
                     help="PyTorch backend on a GPU: run decode steps compiled by TorchInductor (faster; experimental: "
                     "see README, Compiled fast path; kernels cached on disk, the first run compiles for minutes)."),
        click.option("--model-name", default=None, help="The model name clients use (default: the artifact "
                     "directory's name)."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def load_model(artifact: Path, backend: str, device: str | None, max_batch: int | None, compile_steps: bool = False):
    from blockrt.runtime import Model

    model = Model.load(artifact, backend=backend, device=device, max_batch=max_batch, compile=compile_steps)
    log.info("loaded %s (%s, %s on %s): batch %d, context %d", artifact, model.manifest.kind, model.backend, model.device,
             model.max_batch, model.manifest.limits.max_context)
    return model


@click.command("serve")
@server_options
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (0.0.0.0 for every interface, e.g. behind a load balancer).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
def command(artifact, backend, device, max_batch, max_queue, compile_steps, model_name, host, port) -> None:
    """Serve the artifact in DIR over HTTP, OpenAI style, with continuous batching.

    \b
    Endpoints:
      POST /v1/completions   prompt (text or token ids), max_tokens, temperature, top_p, top_k,
                             seed, stop, stop_token_ids, ignore_eos, stream (server-sent events)
      GET  /v1/models        the served model
      GET  /health           200 while the engine thread runs
      GET  /metrics          Prometheus: queue depth, batch, tokens, TTFT and latency histograms

    \b
    Examples:
      blockrt serve artifacts/tiny --backend torch --port 8000
      curl -s localhost:8000/v1/completions -H 'Content-Type: application/json' \\
           -d '{"prompt": [1, 2, 3], "max_tokens": 16, "temperature": 0}'
    """
    for module in ("fastapi", "uvicorn", "prometheus_client"):
        require(module, "serve", "blockrt serve")
    from blockrt.runtime.serve import serve

    model = load_model(artifact, backend, device, max_batch, compile_steps)
    log.info("serving on http://%s:%d (queue limit %d)", host, port, max_queue)
    serve(model, host=host, port=port, max_queue=max_queue, model_name=model_name or artifact.resolve().name)
