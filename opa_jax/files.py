"""Whole-file writes that a kill cannot leave half done."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import BinaryIO


def write_atomic(path: str, content: bytes | str | Callable[[BinaryIO], object]) -> None:
    """Writes `path` whole or not at all: into a temporary file beside it, renamed over it.

    `content` is the bytes or text to write, or a function that writes to the open file.
    """
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        if callable(content):
            content(f)
        else:
            f.write(content.encode() if isinstance(content, str) else content)
    os.replace(tmp, path)
