"""The text of a request that prefix-aware routing hashes: DB-GPT's
``messages`` rendered in order (role, length, content per message — so two
different conversations never render alike, and conversations sharing their
first k messages share a text prefix), else its ``prompt``. The same for a
``RayWorkerManager`` caller and for the gateway (which translates OpenAI's
requests into DB-GPT's before routing them)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any


def prompt_text(params: Mapping[str, Any] | None) -> str | None:
    """The rendered prompt of a DB-GPT inference request, or None if it has none."""
    if not isinstance(params, Mapping):
        return None
    messages = params.get("messages")
    if isinstance(messages, list) and messages:
        parts = []
        for message in messages:
            if not isinstance(message, Mapping):
                continue
            content = message.get("content", "")
            if not isinstance(content, str):
                content = json.dumps(content, sort_keys=True, default=str)
            parts.append(f"{message.get('role', '')}:{len(content)}:{content}\n")
        return "".join(parts) or None
    prompt = params.get("prompt")
    return prompt if isinstance(prompt, str) and prompt else None
