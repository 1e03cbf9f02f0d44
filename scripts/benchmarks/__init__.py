"""The sections of `make bench` (``scripts/bench.py``), one module each, and what they share (``harness``, ``cli``).

A section is ``run(context) -> dict``: everything it reads comes in through its :class:`~.harness.Context`, so it
runs alone or after any other section with the same result structure.
"""
