"""The floor under the gateway's own cost: the least a Python HTTP hop in
front of a worker can add to the first token on this machine.

A raw ASGI app on uvicorn (httptools, as the gateway) that forwards a request
body as it is to one worker's ``/api/worker/generate_stream`` over a kept-open
aiohttp session and streams the worker's bytes back — no key check, no
parsing, no routing, no translation. bench/gateway.py runs it beside the
gateway; whatever the gateway adds beyond it is the gateway's own work.

    python -m bench.passthrough --port P --worker-port W [--loop asyncio|uvloop]
"""

from __future__ import annotations

import argparse

import aiohttp
import uvicorn


def app_for(worker_port: int):
    url = f"http://127.0.0.1:{worker_port}/api/worker/generate_stream"
    session: aiohttp.ClientSession | None = None

    async def app(scope, receive, send) -> None:
        nonlocal session
        if scope["type"] != "http":
            return
        if session is None:
            session = aiohttp.ClientSession()
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        async with session.post(url, data=body, headers={"content-type": "application/json"}) as resp:
            await send({"type": "http.response.start", "status": resp.status,
                        "headers": [(b"content-type", b"text/event-stream")]})
            async for chunk in resp.content.iter_any():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--worker-port", type=int, required=True)
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    args = parser.parse_args()
    uvicorn.run(app_for(args.worker_port), host="127.0.0.1", port=args.port, loop=args.loop, http="httptools",
                log_level="warning", access_log=False, lifespan="off")


if __name__ == "__main__":
    main()
