"""A small OpenAI-compatible server for loopback tests: what DB-GPT's
``proxy/openai`` workers send chats and embeddings to, so a whole DB-GPT chat
path runs with no GPU and no network.

    python -m tests.openai_stub --port 0     # prints "listening on 127.0.0.1:PORT"

It answers ``/v1/chat/completions`` (plain and streamed as server-sent
events), ``/v1/embeddings`` and ``/v1/models``; ``--delay`` seconds per answer
(per chunk when streaming).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import time
import uuid
from typing import Any

from fastapi import FastAPI
from fastapi.responses import StreamingResponse

from actors.serving import HttpServer, serve_until_signalled


def app(delay: float) -> FastAPI:
    api = FastAPI(docs_url=None, redoc_url=None)

    def reply(body: dict[str, Any]) -> str:
        messages = body.get("messages") or [{}]
        return f"stub reply to: {messages[-1].get('content', '')}"

    @api.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": "stub", "object": "model", "created": 0, "owned_by": "tests"}]}

    @api.post("/v1/chat/completions")
    async def chat(body: dict[str, Any]):
        text, model, created = reply(body), body.get("model", "stub"), int(time.time())
        ident = f"chatcmpl-{uuid.uuid4().hex[:12]}"
        if not body.get("stream"):
            await asyncio.sleep(delay)
            return {"id": ident, "object": "chat.completion", "created": created, "model": model,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                 "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 3, "completion_tokens": len(text.split()),
                              "total_tokens": 3 + len(text.split())}}

        async def events():
            for word in text.split(" "):
                await asyncio.sleep(delay)
                chunk = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model,
                         "choices": [{"index": 0, "delta": {"role": "assistant", "content": word + " "},
                                      "finish_reason": None}]}
                yield f"data: {json.dumps(chunk)}\n\n"
            last = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model,
                    "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
            yield f"data: {json.dumps(last)}\n\ndata: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @api.post("/v1/embeddings")
    async def embeddings(body: dict[str, Any]) -> dict[str, Any]:
        texts = body.get("input") or []
        texts = [texts] if isinstance(texts, str) else texts
        await asyncio.sleep(delay)
        vectors = [[b / 255 for b in hashlib.sha256(str(t).encode()).digest()[:8]] for t in texts]
        return {"object": "list", "model": body.get("model", "stub"),
                "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)],
                "usage": {"prompt_tokens": len(texts), "total_tokens": len(texts)}}

    return api


async def _serve(port: int, delay: float) -> None:
    server = HttpServer(app(delay), "127.0.0.1", port)
    await server.start()
    await serve_until_signalled(f"127.0.0.1:{server.port}", server.stop)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--delay", type=float, default=0.0)
    args = parser.parse_args()
    asyncio.run(_serve(args.port, args.delay))


if __name__ == "__main__":
    main()
