"""Replace a file in one step, so a reader sees the old content or the new, never half."""
from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable


def write_atomically(path, write: Callable[[BinaryIO], None], durable: bool = False) -> None:
    """Call write(file) on a temporary file beside `path`, then os.replace it onto `path`.

    The temporary file is in the same folder because os.replace is atomic only within
    one file system. `durable` fsyncs the data first (checkpoints: a power cut must not
    leave an empty file behind a successful rename); progress files skip it, being cheap
    to lose and written often.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if os.path.lexists(path) and not path.is_file():
        # os.replace would put a file where a folder fails late, or where a device node
        # (MAGVIT_PROGRESS_FILE=/dev/full, run as root) silently destroys it
        raise OSError(errno.EEXIST, "not a regular file", str(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide the file from other users
        with os.fdopen(fd, "wb") as f:
            write(f)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def write_text_atomically(path, text: str) -> None:
    """Replace `path` with `text` (UTF-8) atomically."""
    write_atomically(path, lambda f: f.write(text.encode("utf-8")))
