"""WebDataset shards read as streams, so a data set need not be on this machine's disk.

A shard is a tar whose members `KEY.png|jpg|jpeg|webp` and `KEY.txt` (same KEY, next to each other) make
one sample. Shards are named as WebDataset names them:

    /data/shard-000.tar                         a local file
    https://host/shard-{000..099}.tar           a URL; {000..099} and {a,b} expand, zero padding kept
    pipe:aws s3 cp s3://bucket/shard-000.tar -  WebDataset's convention: the command's stdout is the tar

Each shard is read once, front to back, and never stored; the trainer keeps only the latents it
encodes from it.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tarfile
import tempfile
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import BinaryIO

from PIL import Image

from sdlab.errors import SdlabError
from sdlab.train.sources import IMAGE_SUFFIXES, open_image

STREAM_PREFIXES = ("pipe:", "http://", "https://")
_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")
_CHOICE = re.compile(r"\{([^{}]*,[^{}]*)\}")
_KEY = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # key = folders + name up to its first dot


def expand_braces(url: str) -> list[str]:
    """`shard-{000..002}.tar` -> shard-000.tar, shard-001.tar, shard-002.tar; `{a,b}` -> a, b. The leftmost
    group varies slowest, as in WebDataset's braceexpand; zero padding is kept."""
    found = [m for m in (_RANGE.search(url), _CHOICE.search(url)) if m]
    if not found:
        return [url]
    m = min(found, key=lambda x: x.start())
    if m.re is _RANGE:
        start, end = m.group(1), m.group(2)
        if int(end) < int(start):
            raise SdlabError(f"{url}: the range {m.group(0)} runs backwards")
        width = len(start) if start.startswith("0") else 0
        parts = [str(n).zfill(width) for n in range(int(start), int(end) + 1)]
    else:
        parts = m.group(1).split(",")
    return [u for part in parts for u in expand_braces(url[: m.start()] + part + url[m.end():])]


def is_stream(spec: Sequence[str]) -> bool:
    """Whether `--data` names streamed shards (URLs, pipes or brace ranges) rather than local paths or globs."""
    return any(s.startswith(STREAM_PREFIXES) or _RANGE.search(s) or _CHOICE.search(s) for s in spec)


def shard_urls(spec: Sequence[str]) -> list[str]:
    urls = [u for s in spec for u in expand_braces(s)]
    bad = [u for u in urls if not u.startswith("pipe:") and not u.split("?")[0].endswith(".tar")]
    if bad:
        raise SdlabError(f"streamed data must be .tar shards (or pipe: commands); got {bad[0]}")
    return urls


@contextmanager
def open_stream(url: str) -> Iterator[BinaryIO]:
    """A shard's bytes as a stream: a pipe's stdout, an HTTP response, or a file."""
    if url.startswith("pipe:"):
        command = url[len("pipe:"):]
        if not command.strip() or shutil.which(command.split()[0]) is None:
            raise SdlabError(f"{url}: the command {command.split()[0] if command.strip() else '(none)'!r} is not found")
        # stderr to a file, not a pipe: a command that writes much of it (progress bars) would otherwise block
        # on a full pipe nobody reads while we read its stdout
        with tempfile.TemporaryFile() as errors:
            proc = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, stderr=errors)  # noqa: S602
            try:
                yield proc.stdout  # type: ignore[misc]
            finally:
                proc.stdout.close()  # type: ignore[union-attr]
                if proc.wait() != 0:
                    errors.seek(0)
                    error = errors.read().decode(errors="replace").strip()
                    raise SdlabError(f"{url}: the command failed (exit {proc.returncode}): "
                                     f"{error.splitlines()[-1] if error else ''}")
    elif url.startswith(("http://", "https://")):
        try:
            response = urllib.request.urlopen(url, timeout=60)  # noqa: S310 — the user's own data URL
        except OSError as e:
            raise SdlabError(f"{url}: could not fetch ({e})") from None
        with response:
            yield response
    else:
        try:
            f = open(url, "rb")
        except OSError as e:
            raise SdlabError(f"{url}: unreadable ({e.strerror})") from None
        with f:
            yield f


def shard_samples(url: str) -> Iterator[tuple[Image.Image, str]]:
    """(image, caption) of every sample of one shard, in order, reading it once as a stream."""
    pending: dict[str, object] = {}
    key_now = None

    def flush() -> Iterator[tuple[Image.Image, str]]:
        if key_now is None or "image" not in pending:
            return
        if "caption" not in pending:
            raise SdlabError(f"{url}: sample {key_now!r} has an image but no .txt caption")
        yield pending["image"], pending["caption"]  # type: ignore[misc]

    with open_stream(url) as stream:
        try:
            with tarfile.open(fileobj=stream, mode="r|") as tar:
                for member in tar:
                    match = _KEY.match(member.name)
                    if not member.isfile() or not match:
                        continue
                    key, ext = match.group(1), match.group(2).lower()
                    if key != key_now:
                        yield from flush()
                        pending, key_now = {}, key
                    data = tar.extractfile(member).read()  # type: ignore[union-attr]
                    if f".{ext}" in IMAGE_SUFFIXES:
                        pending["image"] = open_image(data, f"{url}:{member.name}")
                    elif ext == "txt":
                        pending["caption"] = data.decode("utf-8").strip()
                yield from flush()
        except tarfile.TarError as e:
            raise SdlabError(f"{url}: not a readable tar stream ({e})") from None


def stream_samples(spec: Sequence[str]) -> Iterator[tuple[Image.Image, str]]:
    """Every sample of every shard of `spec`, shard after shard."""
    for url in shard_urls(spec):
        yield from shard_samples(url)
