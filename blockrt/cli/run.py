"""`blockrt run`: generate with an exported artifact on TensorRT, ONNX Runtime or PyTorch."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from blockrt.backends import BACKEND_CHOICES
from blockrt.errors import UserError

from .options import compile_option, generation_config, parse_ids, read_prompts_file, sampling_options

log = logging.getLogger("blockrt.run")


@click.command("run")
@click.argument("artifact", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--backend", type=click.Choice(BACKEND_CHOICES), default="auto",
              show_default=True, help="auto: tensorrt if engines were built and a GPU is present, torch on a GPU, "
              "else onnxruntime.")
@click.option("--device", default=None, help="cpu or cuda[:N] (default: cuda for tensorrt/torch when present).")
@click.option("--max-batch", type=int, default=None, help="Rows run at once (default and limit: the artifact's).")
@compile_option
@click.option("--prompt-ids", "prompt_ids", multiple=True, metavar="IDS",
              help="Comma-separated token ids of one prompt; repeat for a batch.")
@click.option("--prompt", "prompt_texts", multiple=True, metavar="TEXT",
              help="Prompt text (needs a tokenizer in the artifact: export with --tokenizer); repeatable.")
@click.option("--prompts-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="JSONL: one prompt per line, as a list of ids, a string, or {\"prompt\": ...}/{\"prompt_ids\": [...]}.")
@sampling_options
@click.option("--stream/--no-stream", default=True, show_default=True,
              help="Print tokens as each block completes (ignored with --json).")
@click.option("--json", "as_json", is_flag=True,
              help="Print a JSON list: prompt and generated ids, text, finish reason and timing per prompt.")
def command(artifact, backend, device, max_batch, compile_steps, prompt_ids, prompt_texts, prompts_file, stream, as_json, **sampling):
    """Generate from the prompts with the artifact in ARTIFACT (written by `blockrt export`).

    Prompts of any length run together in one batch; more prompts than --max-batch queue and join
    as rows free up. Each prompt's output is what it would get alone.

    \b
    Examples:
      blockrt run artifacts/tiny --prompt-ids 1,2,3 --prompt-ids 7,8 --max-new-tokens 16
      blockrt run artifacts/tiny --backend torch --prompts-file prompts.jsonl --json
      blockrt run artifacts/pythia --prompt "The capital of France is" --temperature 0.7 --top-p 0.9
    """
    from blockrt.runtime import Model

    prompts: list = [parse_ids(p, "--prompt-ids") for p in prompt_ids] + list(prompt_texts)
    if prompts_file is not None:
        prompts += read_prompts_file(prompts_file)
    if not prompts:
        raise UserError("no prompt: pass --prompt-ids 1,2,3, --prompt TEXT or --prompts-file FILE")
    config = generation_config(**sampling)
    model = Model.load(artifact, backend=backend, device=device, max_batch=max_batch, compile=compile_steps)
    log.info("%s model from %s on %s (%s)", model.manifest.kind, artifact, model.backend, model.device)
    if as_json:
        results = model.generate(prompts, config)
        click.echo(json.dumps([{"prompt_ids": r.prompt_ids, "token_ids": r.token_ids, "text": r.text,
                                "finish_reason": r.finish_reason, "time_to_first_token_s": r.time_to_first_token_s,
                                "latency_s": r.latency_s} for r in results]))
    elif stream:
        _print_stream(model, prompts, config)
    else:
        for i, r in enumerate(model.generate(prompts, config)):
            shown = r.text if r.text is not None else " ".join(map(str, r.token_ids))
            click.echo(f"[{i}] {shown} ({r.finish_reason})")


def _print_stream(model, prompts, config) -> None:
    """One prompt: its tokens on one growing line. Several: a line per chunk, prefixed [index]."""
    single = len(prompts) == 1
    for chunk in model.stream(prompts, config):
        piece = chunk.text if chunk.text is not None else " ".join(map(str, chunk.token_ids))
        end = f" ({chunk.finish_reason})\n" if chunk.finished else ""
        if single:
            sys.stdout.write(piece + ("" if chunk.text is not None else " ") + end)
            sys.stdout.flush()
        else:
            click.echo(f"[{chunk.index}] {piece}{end.rstrip()}")
