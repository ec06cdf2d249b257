"""The prefix cache: block hashing, index, device and host page pools, eviction policy."""
