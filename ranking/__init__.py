"""The ranking side of shoprec: what runs inside Triton, the client that calls it, training.

    pipeline     the one call per micro-batch: retrieval, mixing, filters, scoring, top-K,
                 explanations (RecommendRequest -> TopK), run by Triton (and by the
                 worker's fallback)
    fusion       fused_ranker v1's fixed-weight scoring and the explanations every version
                 gives
    model        the trained fused ranker (FusedRanker) and its item cache / score split
    serve        the trained ranker as a pipeline scorer (fused_ranker v2)
    triton_model the python-backend glue every fused_ranker version shares
    encoder      BERT text encoder (all-MiniLM-L6-v2, offline): text -> 384-d unit vectors
    client       the one async Triton client (RankerClient) the worker uses
    data, train, evaluate, baselines, export   training and offline evaluation

``model_repo/*/<version>/model.py`` are thin Triton wrappers around these modules.
"""
