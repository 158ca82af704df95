"""The `blockrt` command line: one module per verb, each only parsing flags and calling the library."""

from __future__ import annotations

import importlib
import logging
import sys

import click

# verb -> module under blockrt.cli that defines a click command named `command`
VERBS = {
    "presets": "presets",
    "generate": "generate",
    "export": "export",
    "build": "build",
    "verify": "verify",
    "run": "run",
    "bench": "bench",
    "serve": "serve",
    "triton": "triton",
    "demo": "demo",
}


class _LazyGroup(click.Group):
    """Imports a verb's module only when that verb runs (torch and friends load slowly)."""

    def list_commands(self, ctx):
        return list(VERBS)

    def get_command(self, ctx, name):
        if name not in VERBS:
            return None
        return importlib.import_module(f"blockrt.cli.{VERBS[name]}").command


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("-v", "--verbose", count=True, help="More log output (-v: debug). Progress is logged at info by default.")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors in the log.")
@click.version_option(package_name="blockrt")
def cli(verbose: int, quiet: bool) -> None:
    """blockrt: export Block Transformer language models to ONNX, compile them to TensorRT engines,
    and run them with TensorRT, ONNX Runtime or PyTorch.

    \b
    Typical flow:
      blockrt export --preset tiny_block --out artifacts/tiny     # ONNX graphs + manifest.json
      blockrt verify artifacts/tiny                               # check against PyTorch
      blockrt build artifacts/tiny                                # TensorRT engines (optional)
      blockrt run artifacts/tiny --prompt-ids 1,2,3               # generate
      blockrt bench artifacts/tiny --against tiny_vanilla --against hf   # measure (hf: transformers)
    """
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    # no-op where the root logger already has handlers (an embedding program, pytest); the level always applies
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        handlers=[_StderrHandler()])
    logging.getLogger().setLevel(level)


class _StderrHandler(logging.StreamHandler):
    """Logs to the sys.stderr of the moment a record is emitted, not of the first invocation: the
    CLI can be invoked many times in one process (click's test runner swaps sys.stderr each time)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value):
        pass


def main() -> None:
    """Entry point: user errors (bad flags, files, values) exit 2 with one clear line, no traceback."""
    from blockrt.errors import UserError

    try:
        cli(standalone_mode=False, prog_name="blockrt")
    except click.exceptions.Abort:
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except UserError as e:
        click.echo(f"Error: {e}", err=True)
        sys.exit(2)
