"""Server-Sent Events as OpenAI sends them: ``data: <json>\\n\\n`` per event, ``data: [DONE]`` last."""
from __future__ import annotations

import json

DONE = "data: [DONE]\n\n"


def event(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
