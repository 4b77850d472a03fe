"""Every MOETOOL_* environment variable, read once.

| variable         | meaning                                                        | default |
| ---------------- | -------------------------------------------------------------- | ------- |
| MOETOOL_DEBUG    | ``1``: show the full traceback of an error instead of one line  | off     |
| MOETOOL_HUB_ALLOW| extra file patterns to download from the Hub, comma-separated   | none    |

The Hub itself honours its own variables (``HF_HUB_OFFLINE``, ``HF_HOME``, ``HF_HUB_CACHE``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Env:
    debug: bool
    hub_allow: tuple[str, ...]


def _read() -> Env:
    return Env(
        debug=os.environ.get("MOETOOL_DEBUG", "") not in ("", "0", "false"),
        hub_allow=tuple(p for p in os.environ.get("MOETOOL_HUB_ALLOW", "").split(",") if p),
    )


ENV = _read()
