"""User errors and the one exit policy of every script (torch-free).

    if __name__ == "__main__":
        sys.exit(run_script(main, get_args_parser().parse_args()))

A script's `main(args)` raises `UserError` for bad input and returns its exit status (or nothing); it
never calls `sys.exit`, so the demo and the tests call it like any function. `run_script` turns a
UserError into one line, `error: <message>`, on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, Callable


class UserError(Exception):
    """A problem with the user's input (an argument, a file): its message names it and says what to do."""


def one_line(err: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (libraries often add pages), at most `limit`
    characters, or its type's name."""
    lines = [" ".join(line.split()) for line in str(err).splitlines() if line.strip()]
    text = lines[0] if lines else type(err).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def run_script(main: Callable[[argparse.Namespace], Any], args: argparse.Namespace) -> int:
    """Run a script's main: its exit status when it returns an int, else 0; 2 for a UserError."""
    try:
        status = main(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return status if isinstance(status, int) and not isinstance(status, bool) else 0
