"""kvgate: a multi-tenant prompt-caching gateway for LLM serving.

Parts: ``kvgate.gateway`` (HTTP APIs, engine, ledger, router, CLI), ``kvgate.cachestore``
(paged KV prefix cache and its tiers), ``kvgate.kernels`` (attention and page-copy kernels
with their torch references) and ``kvgate.migrations`` (the ledger's Alembic revisions).
"""
