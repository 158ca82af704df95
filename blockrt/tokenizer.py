"""Opening a Hugging Face `tokenizers` tokenizer.json: the one place that turns a missing or
malformed file into a UserError naming it, wherever it is read (the CLI's --tokenizer, an
export's tokenizer, an artifact's tokenizer.json)."""

from __future__ import annotations

import os
from pathlib import Path

from blockrt.errors import UserError


def load_tokenizer(path: str | os.PathLike, what: str = "tokenizer"):
    """A `tokenizers.Tokenizer` from `path`; `what` names the file's role in errors (a flag like
    "--tokenizer", or "the artifact's tokenizer")."""
    from tokenizers import Tokenizer

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path}: no such file (expected a Hugging Face tokenizer.json)")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for unreadable or malformed files
        raise UserError(f"{what} {path}: not a readable Hugging Face tokenizer.json ({e})") from None
