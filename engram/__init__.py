"""engram: Engram conditional memory served from host RAM over gRPC, trained with Ray.

The product's top level: its version and the `engram` command (engram.cli). The layers live in
the design's packages, from the bottom up:

    engram_store.engine   the shard engine: rows, optimizer state, LMDB (numpy, lmdb only)
    engram_store.rpc      gRPC over the engine: wire, servicer, server, client, auth, metrics
    engram_store.ops      snapshot, restore, export
    cluster               shards as Ray actors: registry, placement, resharding   (extra [cluster])
    trainer               hashing, the gated module, the GPT, prefetch, the loop  (extra [train])
    engram                the `engram` command: the only code that imports every layer

See docs/design.md for the whole picture and docs/layers.md for the import rules a test enforces.
"""

__version__ = "0.3.0"
