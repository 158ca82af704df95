"""Parsing of values a user typed (comma-separated lists), with errors in the words of the input."""

from __future__ import annotations

from blockrt.errors import UserError


def parse_int_list(text: str, flag: str, minimum: int = 0, item: str = "integer") -> list[int]:
    """'1,2,3' -> [1, 2, 3]. An empty list, an item that is not an integer or one below `minimum` is a
    UserError naming the flag and the bad item (`item` says what each value is, e.g. "token id")."""
    values = []
    for part in (s.strip() for s in text.split(",")):
        try:
            value = int(part)
        except ValueError:
            raise UserError(f"{flag} {text!r}: {part!r} is not an integer {item} "
                            f"(expected comma-separated values like 1,2,3)") from None
        if value < minimum:
            raise UserError(f"{flag} {text!r}: {item} {value} is " + ("negative" if minimum == 0 else f"below {minimum}"))
        values.append(value)
    return values
