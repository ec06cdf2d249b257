"""What every aiohttp front end (``kvgate serve``, ``kvgate route``) shares: middleware,
errors in each API's shape, body reading and limits, SSE, the transport's timeouts."""
