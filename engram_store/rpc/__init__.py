"""The gRPC layer: the engine's Shard served as engram.v1.MemoryStore, and its client.

May import engram_store.engine, grpcio (with health and reflection), protobuf and
prometheus_client; never engram_store.ops, cluster, trainer or engram.

    proto        generated stubs of proto/engram/v1/store.proto (committed; do not edit)
    config       AuthConfig, ServerConfig (nests the engine's ShardConfig), ClientConfig
    wire         dataclasses / numpy arrays <-> engram.v1 messages, packed without extra copies
    status       errors on the wire: class name in trailing metadata `engram-error`, both ways
    retry        the one retry policy (which errors retry, backoff, budget)
    servicer     MemoryStoreServicer: decode the request, one Shard call, encode the answer
    server       create_server(), stop_server(), serve(); server_extras() (metrics, auth, admin)
    admin        engram.v1.StoreAdmin: the snapshot gate and the shard side of a snapshot
    client       StoreClient: routing, dedup, parallel fan-out, futures, retries, request ids
    auth         bearer-token interceptor (read / write), TLS credentials, open_channel()
    metrics      ServerMetrics (Prometheus), scrape(), summarize()
"""
