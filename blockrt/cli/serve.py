"""`blockrt serve`: serve an artifact over an OpenAI-compatible HTTP API (FastAPI + uvicorn). Also
holds the flags and model loading that `blockrt triton` shares (`server_options`, `load_model`)."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from blockrt.backends import BACKEND_CHOICES
from blockrt.errors import require

from .options import compile_option

log = logging.getLogger("blockrt.serve")


def server_options(f, artifact_required: bool = True):
    """The artifact argument and the model/queue flags of the serving verbs."""
    options = [
        click.argument("artifact", metavar="DIR", required=artifact_required,
                       type=click.Path(exists=True, file_okay=False, path_type=Path)),
        click.option("--backend", type=click.Choice(BACKEND_CHOICES), default="auto",
                     show_default=True, help="auto: tensorrt if engines were built and a GPU is present, torch on a "
                     "GPU, else onnxruntime."),
        click.option("--device", default=None, help="cpu or cuda[:N] (default: cuda for tensorrt/torch when present)."),
        click.option("--max-batch", type=click.IntRange(1), default=None,
                     help="Sequences generated at once (default and limit: the artifact's max batch)."),
        click.option("--max-queue", type=click.IntRange(1), default=256, show_default=True,
                     help="Requests allowed to wait for a batch row; beyond it new requests are refused "
                     "(HTTP 429 with Retry-After; Triton: an error response)."),
        compile_option,
        click.option("--model-name", default=None, help="The model name clients use (default: the artifact "
                     "directory's name)."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def load_model(artifact: Path, backend: str, device: str | None, max_batch: int | None, compile_steps: bool | None = None):
    from blockrt.runtime import Model

    model = Model.load(artifact, backend=backend, device=device, max_batch=max_batch, compile=compile_steps)
    log.info("loaded %s (%s, %s on %s): batch %d, context %d", artifact, model.manifest.kind, model.backend, model.device,
             model.max_batch, model.manifest.limits.max_context)
    return model


def engine_specs(artifact: Path | None, preset: str | None, backend: str, device: str | None, devices: str | None,
                 data_parallel: int | None, max_batch: int | None, dtype: str, max_context: int,
                 compile_steps: bool | None = None):
    """One ModelSpec per engine process: the artifact (or preset) on each device."""
    from blockrt.errors import UserError
    from blockrt.runtime.serve import ModelSpec

    if (artifact is None) == (preset is None):
        raise UserError("give an artifact directory DIR or --preset NAME (random weights), not both or neither")
    if preset is not None:
        from blockrt.exporter import get_preset

        try:
            get_preset(preset)
        except ValueError as e:
            raise UserError(f"--preset: {e}") from None
        backend = "torch"
    if sum(x is not None for x in (device, devices, data_parallel)) > 1:
        raise UserError("give at most one of --device, --devices and --data-parallel")
    if devices is not None:
        names = [d.strip() for d in devices.split(",") if d.strip()]
        if not names or len(set(names)) != len(names):
            raise UserError(f"--devices {devices!r}: expected distinct devices like cuda:0,cuda:1")
    elif data_parallel is not None:
        names = [f"cuda:{i}" for i in range(data_parallel)]
    else:
        names = [device]
    return [ModelSpec(artifact=None if artifact is None else str(artifact), preset=preset, backend=backend, device=name,
                      max_batch=max_batch, dtype=dtype, max_context=max_context,
                      name=preset or artifact.resolve().name, compile=compile_steps) for name in names]


def engine_options(f):
    """The flags that choose what each engine process loads and where (`serve`, `bench --serve`)."""
    from blockrt.graphs.contract import DTYPES

    options = [
        click.option("--preset", default=None, help="Serve a preset with random weights on the PyTorch engine instead "
                     "of an artifact (benchmarks; no tokenizer: token-id prompts only)."),
        click.option("--dtype", type=click.Choice(DTYPES), default="bf16", show_default=True, help="dtype of --preset."),
        click.option("--max-context", type=click.IntRange(16), default=2304, show_default=True,
                     help="Context (prompt + generated tokens) of --preset."),
        click.option("--devices", default=None, metavar="LIST",
                     help="One engine process per device, e.g. cuda:0,cuda:1; requests go to the least-loaded one."),
        click.option("--data-parallel", type=click.IntRange(1), default=None, metavar="N",
                     help="Shorthand for --devices cuda:0,...,cuda:N-1."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def limit_options(f):
    options = [
        click.option("--max-body-bytes", type=click.IntRange(1024), default=4 * 1024 * 1024, show_default=True,
                     help="Larger request bodies get 413 before they are read."),
        click.option("--header-timeout", type=click.FloatRange(min=0, min_open=True), default=10.0, show_default=True,
                     help="Seconds a connection may take to send a request's headers before it is closed."),
        click.option("--body-timeout", type=click.FloatRange(min=0, min_open=True), default=30.0, show_default=True,
                     help="Seconds a request may take to send its body (408 after)."),
        click.option("--shutdown-timeout", type=click.FloatRange(min=0), default=30.0, show_default=True,
                     help="On SIGTERM/SIGINT, seconds open requests may take to finish before they end with a 503 "
                     "error (streams: an error event, then [DONE])."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def http_workers_option(f):
    return click.option("--http-workers", type=click.IntRange(1), default=1, show_default=True,
                        help="HTTP processes sharing the port, each talking to every engine process (for thousands "
                        "of streams, where one event loop cannot keep up; /metrics then answers per worker).")(f)


@click.command("serve")
@lambda f: server_options(f, artifact_required=False)
@engine_options
@limit_options
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (0.0.0.0 for every interface, e.g. behind a load balancer).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@http_workers_option
def command(artifact, backend, device, max_batch, max_queue, compile_steps, model_name, preset, dtype, max_context,
            devices, data_parallel, max_body_bytes, header_timeout, body_timeout, shutdown_timeout, host, port,
            http_workers) -> None:
    """Serve the artifact in DIR (or a --preset) over HTTP, OpenAI style, with continuous batching.

    The model runs in an engine process of its own (one per device with --devices), so the GPU
    loop never waits for HTTP work; this process parses requests and streams responses.

    \b
    Endpoints:
      POST /v1/completions   prompt (text or token ids), max_tokens, temperature, top_p, top_k,
                             seed, stop, stop_token_ids, ignore_eos, stream (server-sent events)
      GET  /v1/models        the served model
      GET  /health           200 while an engine runs (503 when none does or while shutting down)
      GET  /metrics          Prometheus: queue depth, batch, tokens, TTFT and latency per engine

    \b
    Examples:
      blockrt serve artifacts/tiny --backend torch --port 8000
      blockrt serve artifacts/b1.2b --devices cuda:0,cuda:1 --max-batch 1024
      curl -s localhost:8000/v1/completions -H 'Content-Type: application/json' \\
           -d '{"prompt": [1, 2, 3], "max_tokens": 16, "temperature": 0}'
    """
    for module in ("fastapi", "uvicorn", "prometheus_client"):
        require(module, "serve", "blockrt serve")
    from blockrt.runtime.serve import HTTPLimits, serve

    specs = engine_specs(artifact, preset, backend, device, devices, data_parallel, max_batch, dtype, max_context,
                         compile_steps)
    limits = HTTPLimits(max_body_bytes, header_timeout, body_timeout, shutdown_timeout)
    log.info("starting %d engine process(es) for %s", len(specs), specs[0].describe())
    serve(specs, host=host, port=port, max_queue=max_queue, model_name=model_name, limits=limits,
          http_workers=http_workers)
