"""The ranking side of shoprec: what runs inside Triton, the client that calls it, training.

    encoder      BERT text encoder (all-MiniLM-L6-v2, offline): text -> 384-d unit vectors
    fusion       the fused ranker's maths and its request contract (RankBatch)
    client       the one async Triton client (RankerClient) the worker uses

``model_repo/*/1/model.py`` are thin Triton wrappers around ``encoder`` and ``fusion``.
"""
