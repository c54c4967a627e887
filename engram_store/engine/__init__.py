"""The shard engine: one shard's tables, rows and optimizer state in an LMDB environment.

The bottom layer: imports only the standard library, numpy, lmdb and mmh3 (never grpc,
protobuf, prometheus_client, ray or torch), and nothing else of this project.

    config       frozen dataclasses: OptimizerConfig, TableConfig, ShardConfig (the shard's
                 LMDB and limits; how it is served is rpc.config.ServerConfig)
    errors       EngramError and one subclass per failure, each with its gRPC status code
    types        TableStats, PushResult, ShardStateInfo: the values a shard hands out (no lmdb)
    routing      slot_of(), fmix64(), ShardMap: row id -> hash slot -> shard, versioned
    dtypes       float32 <-> bfloat16 / float16 packing for storage and the wire
    init         initial_rows(): never-pushed rows as a pure function of (seed, row id, column)
    optimizers   sparse SGD, Adagrad, Adam with torch.optim's arithmetic
    records      how a row and its optimizer state pack into one LMDB record
    mirror       the RAM mirror of hot records and its reader/writer lock (internal to Shard)
    shard        Shard: lookup, push, tables, ownership, export/import/delete, snapshot
"""
