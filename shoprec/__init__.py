"""shoprec: a real-time streaming recommender for online shops.

This package is the bottom layer, the contracts every other package shares:
errors, settings, the event records and their one type vocabulary (``events``),
the output record (``output``), the dead-letter record (``dlq``), and the retry
and redaction policies.  It imports nothing of the packages above it:

    cli       the `shoprec` command and the demo
    bench     the benchmarks
    ops       offline tools: replay, rebuild-state, inspect, dlq, produce, tail
    streams   the live path: the Faust app, its runtime, metrics, consumer lag
    ranking   models, the Triton client, training, evaluation
    features  the feature state and its stores (Redis, the in-memory fold)
    shoprec   these contracts

``infra`` (the local stack) sits just above the contracts; only ``cli``,
``bench`` and the tests use it.  ``make lint`` checks the direction
(``[tool.importlinter]`` in pyproject.toml).
"""

__version__ = "0.1.0"
