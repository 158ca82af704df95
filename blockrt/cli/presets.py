"""`blockrt presets`: the built-in model shapes and their parameter counts."""

from __future__ import annotations

import json

import click


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n / 1e3:.1f}K"


def _stacks(row: dict) -> str:
    if row["kind"] == "block":
        return f"block {row['block_decoder']}, token {row['token_decoder']}"
    return row["decoder"]


@click.command("presets")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of objects instead of a table.")
def command(as_json: bool) -> None:
    """List the model presets: kind, layers x width of each stack, block length and parameters.

    Non-embedding parameters are what the names of the published models count (block_main_b4_85:
    about 85M)."""
    from blockrt.exporter.presets import PRESETS, preset_summary

    rows = [preset_summary(name) for name in PRESETS]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    header = ("name", "kind", "layers x width", "L", "params", "non-embedding")
    table = [header] + [
        (r["name"], r["kind"], _stacks(r), str(r["block_len"]), _count(r["params"]), _count(r["non_embedding_params"]))
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
