"""What a control plane's refusal says: its JSON body is ``{"error": message, "field": name}`` (field optional)."""

from __future__ import annotations

import httpx


def refusal(response: httpx.Response) -> tuple[str | None, str | None]:
    """The ``error`` and ``field`` of ``response``'s body; None for either when the body does not carry it."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict) or not isinstance(body.get("error"), str):
        return None, None
    field = body.get("field")
    return body["error"], field if isinstance(field, str) and field else None
