"""The shard engine: one shard's tables in dense host-RAM arrays, durable in an LMDB push log.

The bottom layer: imports only the standard library, numpy, lmdb, mmh3 and numba (never grpc,
protobuf, prometheus_client, ray or torch), and nothing else of this project.

    config       frozen dataclasses: OptimizerConfig, TableConfig, ShardConfig (the shard's
                 LMDB, memory budget and limits; how it is served is rpc.config.ServerConfig)
    errors       EngramError and one subclass per failure, each with its gRPC status code
    types        TableStats, PushResult, ShardStateInfo: the values a shard hands out (no lmdb)
    routing      slot_of(), fmix64(), ShardMap: row id -> hash slot -> shard, versioned
    dtypes       float32 <-> bfloat16 / float16 packing for storage and the wire
    init         initial_rows(): never-pushed rows as a pure function of (seed, row id, column)
    optimizers   numpy reference optimizers (torch.optim's arithmetic; FBGEMM's row-wise ones)
    kernels      numba: fused optimizer steps, gather/scatter, dtype conversion, checksums
    index        id -> offset index of a table's arrays; one-pass dedup of pushed ids
    arrays       TableArrays: one table's rows, state and ids in reserved memory maps
    records      on-disk formats: push-log entries and checkpoint chunks, checksummed
    shard        Shard: lookup, push, tables, ownership, export/import/delete, checkpoint,
                 recovery, snapshot
"""
