"""The baseline of the ingest benchmark: Starlette that reads the body and answers 200.

Run by `make bench` with the same uvicorn settings as `salla-rewards serve`, so the ratio
between the two is what the service's own work costs.
"""

from __future__ import annotations

import sys

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from service.server import SERVER_OPTIONS


async def webhook(request: Request) -> JSONResponse:
    await request.body()
    return JSONResponse({"status": "accepted"})


app = Starlette(routes=[Route("/webhooks/salla", webhook, methods=["POST"])])

if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), **SERVER_OPTIONS)
