"""A server process with the users and feedback routers on a store, for the
durability test: `python tests/store_server.py DB_URL PORT`."""

from __future__ import annotations

import asyncio
import contextlib
import sys

import uvicorn
from store_helpers import store_app, store_config

from server.store import Store


def main() -> None:
    url, port = sys.argv[1], int(sys.argv[2])

    @contextlib.asynccontextmanager
    async def lifespan(app):
        app.state.store = await Store.open(store_config(url))
        yield
        await app.state.store.close()

    app = store_app(None)
    app.router.lifespan_context = lifespan
    asyncio.run(uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")).serve())


if __name__ == "__main__":
    main()
