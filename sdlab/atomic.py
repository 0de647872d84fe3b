"""Atomic file writes: a temporary file beside the target, then one rename, so a reader (or a crash,
Ctrl-C or a full disk) never leaves half a file under the target's name."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from sdlab.errors import SdlabError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call `write(tmp_path)`, then rename the result to `path`; on any failure the temporary file goes.

    mkstemp creates files readable by their owner only; the result gets the permissions an ordinary
    open() would have given it (0o666 less the umask). An OSError (a full disk) becomes a one-line SdlabError."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise SdlabError(f"{path}: cannot be written ({e.strerror or e})") from None
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except OSError as e:  # a full disk, a quota, a vanished folder: nothing is left behind, one line is said
        Path(tmp).unlink(missing_ok=True)
        raise SdlabError(f"{path}: could not be written ({e.strerror or e}); nothing was saved there") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
