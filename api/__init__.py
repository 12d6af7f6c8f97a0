"""The pull API (`shoprec serve`): recommendations on demand over HTTP, from the worker's
state and ranker.  Beside ``bench`` below ``cli``: it may import ``streams``, ``ops``,
``ranking``, ``features`` and ``shoprec``, never ``infra`` or Faust."""
