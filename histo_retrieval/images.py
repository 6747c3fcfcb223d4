"""The one policy for images that cannot be decoded: skip them, go on, report them at the end.

Pillow raises OSError for truncated, corrupt or foreign files, SyntaxError for some broken PNG
chunks, ValueError for impossible modes and sizes, and DecompressionBombError (an Exception of its
own) for images too large to be safe; OpenCV returns None or raises cv2.error. Every reader of the
project catches exactly `UNREADABLE` and nothing broader, so that a real bug still stops the run.
"""
from __future__ import annotations

import os
import sys
from typing import IO

from PIL import Image

UNREADABLE: tuple[type[BaseException], ...] = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """The image as RGB (grey, palette, RGBA and 16-bit converted); raises one of `UNREADABLE`."""
    with Image.open(path) as image:
        return image.convert("RGB")


def report_unreadable(failures: list[tuple[str, str]], stream: IO[str] | None = None) -> None:
    """The end-of-run report: how many images were left out, then one line per file with the reason."""
    unique = sorted(set(failures))
    if not unique:
        return
    stream = stream or sys.stderr
    print(f"{len(unique)} unreadable image(s) were left out:", file=stream)
    for path, reason in unique:
        print(f"  {path} ({reason})", file=stream)
