"""The Engram memory store, in three layers from the bottom up; each imports only those below it.

    engram_store.engine   the shard engine: tables, rows and optimizer state in LMDB
                          (stdlib, numpy, lmdb, mmh3 only)
    engram_store.rpc      gRPC over the engine: servicer, server, StoreClient, auth, metrics
    engram_store.ops      operations: snapshot, restore, export, the cluster.json layout

The store holds rows and applies pushed gradients; it knows nothing of tokens or n-grams (that
is the model side, trainer/). A plain `pip install engram` is enough to run it. See
docs/design.md and docs/layers.md.
"""
