"""Flags shared by the verbs that generate (`generate`, `run`): sampling and prompts."""

from __future__ import annotations

import json
from pathlib import Path

import click

from blockrt.errors import UserError
from blockrt.parsing import parse_int_list
from blockrt.generation import POSITIONS, GenerationConfig

POSITIONS_HELP = ("Token-decoder rotary positions: forward (the training forward pass) or official-generate "
                  "(those of the official BlockTransformer.generate(): both prefix vectors at 0, token k at k "
                  "instead of k + 1).")


def positions_option(f):
    """--positions forward|official-generate (default forward)."""
    return click.option("--positions", type=click.Choice(POSITIONS), default="forward", show_default=True,
                        help=POSITIONS_HELP)(f)


COMPILE_HELP = ("PyTorch engine on a GPU: decode steps compiled by TorchInductor inside CUDA graphs. Default: on "
                "where it runs (CUDA with Triton), else eager (--compile: log why). The first load of a model "
                "compiles for minutes (progress logged; kernels cached on disk, later loads take seconds); "
                "--no-compile runs the steps eagerly (debugging, or no time to compile).")


def compile_option(f):
    """--compile/--no-compile (default: None = on where it runs); the command gets `compile_steps`."""
    return click.option("--compile/--no-compile", "compile_steps", default=None, help=COMPILE_HELP)(f)


def parse_ids(text: str, flag: str) -> list[int]:
    """'1,2,3' -> [1, 2, 3]; anything else is a UserError naming the flag and the bad item."""
    return parse_int_list(text, flag, minimum=0, item="token id")


def sampling_options(f):
    """Add the GenerationConfig flags to a command; it receives them as keyword arguments."""
    options = [
        click.option("--max-new-tokens", default=32, show_default=True, type=int, help="Tokens to generate per prompt."),
        click.option("--temperature", default=0.0, show_default=True, type=float, help="0 = greedy."),
        click.option("--top-k", default=0, show_default=True, type=int, help="Keep the k most likely tokens (0 = off)."),
        click.option("--top-p", default=1.0, show_default=True, type=float, help="Nucleus sampling mass (1 = off)."),
        click.option("--repetition-penalty", default=1.0, show_default=True, type=float, help="1 = off."),
        click.option("--seed", default=0, show_default=True, type=int, help="Seed of sampling (and of random weights)."),
        click.option("--stop-token-ids", default="", metavar="IDS", help="Comma-separated ids that also end a sequence."),
        click.option("--ignore-eos", is_flag=True, help="Do not stop at the model's EOS token."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def generation_config(max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, stop_token_ids,
                      ignore_eos) -> GenerationConfig:
    config = GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                              repetition_penalty=repetition_penalty, seed=seed,
                              stop_token_ids=parse_ids(stop_token_ids, "--stop-token-ids") if stop_token_ids else [],
                              ignore_eos=ignore_eos)
    try:
        config.validate()
    except ValueError as e:
        raise UserError(str(e)) from None
    return config


def read_prompts_file(path: Path, flag: str = "--prompts-file") -> list:
    """JSONL prompts: each line a JSON list of ids, a string, or {"prompt": text} / {"prompt_ids": [...]}."""
    prompts = []
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot read it ({e.strerror})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{flag} {path}, line {n}: not JSON ({e.msg})") from None
        if isinstance(item, dict):
            item = item.get("prompt_ids", item.get("prompt"))
        if isinstance(item, str) or (isinstance(item, list) and all(isinstance(t, int) for t in item)):
            prompts.append(item)
        else:
            raise UserError(f"{flag} {path}, line {n}: expected a list of token ids, a string, or an "
                            f"object with 'prompt' or 'prompt_ids'")
    if not prompts:
        raise UserError(f"{flag} {path} holds no prompts")
    return prompts
