"""``kvgate plan``: the capacity planner (``capacity``: what fits; ``traces`` and ``sweep``:
the hit rate a trace would get at each size; ``cli``: the command)."""
