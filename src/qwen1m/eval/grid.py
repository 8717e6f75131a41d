"""The strings of the eval command line: lengths ("4k,8k,1m") and depths ("0:100:10" or "0,50,100")."""

from __future__ import annotations

import re

from qwen1m.errors import Qwen1mError

_LENGTH = re.compile(r"^(\d+)([kKmM]?)$")
_UNITS = {"": 1, "k": 1024, "m": 1024 * 1024}  # 4k = 4096 and 1m = 1048576 tokens, as in RULER's tables


def parse_lengths(text: str) -> list[int]:
    """"4k,8k,1m" -> [4096, 8192, 1048576], sorted and without duplicates."""
    out = []
    for part in (p.strip() for p in text.split(",")):
        m = _LENGTH.match(part)
        if not m or int(m.group(1)) < 1:
            raise Qwen1mError(f"--lengths item {part!r} is not a token count like 4096, 4k or 1m.")
        out.append(int(m.group(1)) * _UNITS[m.group(2).lower()])
    return sorted(set(out))


def parse_depths(text: str) -> list[float]:
    """Depths in percent: "start:stop:step" (stop included) or a comma list; each in [0, 100]."""
    try:
        if ":" in text:
            start, stop, step = (float(x) for x in text.split(":"))
            if step <= 0:
                raise ValueError
            n = int((stop - start) / step + 1e-9) + 1
            out = [round(start + i * step, 6) for i in range(n)]
        else:
            out = [float(x) for x in text.split(",")]
    except ValueError:
        raise Qwen1mError(f"--depths {text!r} is not 'start:stop:step' (e.g. 0:100:10) or a list: 0,50,100.") from None
    if not out or any(not 0 <= d <= 100 for d in out):
        raise Qwen1mError(f"--depths {text!r} must give depths between 0 and 100 percent.")
    return sorted(set(out))


def length_label(n: int) -> str:
    """4096 -> "4K", 1048576 -> "1M", 1000 -> "1000"."""
    if n % (1024 * 1024) == 0:
        return f"{n // (1024 * 1024)}M"
    if n % 1024 == 0:
        return f"{n // 1024}K"
    return str(n)
