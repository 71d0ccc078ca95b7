"""The one byte-exact JSON form that every hashed or signed document of Edgewise is made of."""

from __future__ import annotations

import json
from typing import Any


def canonical_json(data: Any) -> str:
    """Sorted keys, no spaces, UTF-8 kept as is."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
