"""What clients send and replicas and routers exchange, parsed and checked: request
bodies of both APIs, tools, structured outputs, prompt rendering behind ``ChatRenderer``,
tenant namespaces, and the cache events and snapshot wire formats. No aiohttp here."""
