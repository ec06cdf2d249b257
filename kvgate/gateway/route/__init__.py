"""The routing tier (``kvgate route``) and what replicas offer it."""
