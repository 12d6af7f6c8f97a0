"""shoprec: a real-time streaming recommender for online shops.

The domain lives in sibling packages, one concern each:
``streams`` (Faust agents and event contracts), ``features`` (Redis feature
store and retrieval), ``ranking`` (the ranker's maths and the text encoder),
``infra`` (the local stack).  This package holds what they share: settings,
errors, logging and the CLI.
"""

__version__ = "0.1.0"
