"""Operations over a running store or a snapshot directory.

May import engram_store.engine and engram_store.rpc; never cluster, trainer or engram (the
cluster imports this layer, not the reverse).

    snapshot     snapshot(): a consistent multi-shard snapshot (the coordinator), manifests
    restore      restore(): a snapshot onto any number of shards, offline
    export       export_safetensors(): every row of a table into one safetensors file
    layout       the cluster.json schema and the cluster.lock of a data root
    safetensors_io  Checkpoint / SafetensorsWriter: tensors read and written by row range
    deepseek     import_checkpoint() / export_checkpoint(): DeepSeek-V4.1 Engram tables in the
                 checkpoint's layout (fp8 e4m3 weight + e8m0 scale per layer)
"""
