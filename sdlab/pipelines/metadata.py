"""What is written into each image: AUTOMATIC1111's `parameters` text and sdlab's own record.

A1111's text (shared/REFERENCE-a1111.md) is what other tools read:

    <prompt>
    Negative prompt: <negative>          (left out when empty)
    Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 512x512, Model hash: …, Model: …

sdlab's record (`sdlab` text chunk, JSON) holds every setting needed to make the image again.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping

PARAMETERS_KEY = "parameters"
RECORD_KEY = "sdlab"
NEGATIVE_PREFIX = "Negative prompt: "
_NEEDS_QUOTES = re.compile(r"[,:\"]")
# one `Key: value` pair; a value is either JSON-quoted or runs to the next ", " / end of line
_PAIR = re.compile(r'\s*([\w ()\-/.]+):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


def quote(value: object) -> str:
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if _NEEDS_QUOTES.search(text) else text


def format_parameters(prompt: str, negative: str, pairs: Mapping[str, object]) -> str:
    """A1111's infotext: pairs are written in the order given; None values are left out."""
    line = ", ".join(f"{k}: {quote(v)}" for k, v in pairs.items() if v is not None and v != "")
    text = prompt
    if negative:
        text += f"\n{NEGATIVE_PREFIX}{negative}"
    return f"{text}\n{line}"


def parse_parameters(text: str) -> tuple[str, str, dict[str, str]]:
    """(prompt, negative, {key: value}) from an A1111 infotext; values stay strings."""
    lines = text.strip("\n").split("\n")
    last = lines[-1]
    # A1111's rule: the last line holds the settings when it has at least 3 pairs (so an empty prompt's text,
    # which is the settings line alone, still parses); a "Steps: " line after a prompt does too
    is_settings = bool(_PAIR.match(last)) and (len(_PAIR.findall(last)) >= 3 or (len(lines) > 1 and "Steps: " in last))
    settings_line = last if is_settings else ""
    body = lines[:-1] if settings_line else lines
    prompt_lines, negative_lines, in_negative = [], [], False
    for line in body:
        if line.startswith(NEGATIVE_PREFIX) and not in_negative:
            in_negative = True
            line = line[len(NEGATIVE_PREFIX):]
        (negative_lines if in_negative else prompt_lines).append(line)
    pairs = {}
    for key, value in _PAIR.findall(settings_line):
        value = value.strip()
        pairs[key.strip()] = _unquote(value) if value.startswith('"') else value
    return "\n".join(prompt_lines), "\n".join(negative_lines), pairs


def _unquote(value: str) -> str:
    """A JSON-quoted value; one another program quoted badly stays as written."""
    try:
        decoded = json.loads(value)
    except ValueError:
        return value
    return decoded if isinstance(decoded, str) else value
