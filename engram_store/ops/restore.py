"""Restore a snapshot (engram_store/ops/snapshot.py) offline onto any number of shards."""

from __future__ import annotations

import dataclasses
import json
import os
import uuid

import numpy as np

from engram_store.engine.config import ShardConfig, TableConfig
from engram_store.engine.errors import (
    ConfigError,
)
from engram_store.engine.routing import DEFAULT_SLOTS, ShardMap
from engram_store.engine.shard import Shard, ShardStateInfo
from engram_store.ops.layout import ClusterLayout, lock_data_root, write_layout
from engram_store.ops.snapshot import load_manifest, open_snapshot_shard, owned_mask


def restore(
    source: str,
    data_root: str,
    shards: int | None = None,
    addresses: list[str] | None = None,
    num_slots: int | None = None,
    batch_rows: int = 65536,
    map_size: int | None = None,
) -> dict:
    """Restore a snapshot offline into `<data_root>/shard-<j>` for `shards` shards (default: as
    many as the snapshot had), re-routing every row with a new balanced ShardMap.

    One shard: a standalone data directory (`engram serve --data <data_root>/shard-0`). Several:
    a cluster layout (`cluster.json`), reopened with `engram cluster up --data <data_root>
    --shards M --slots S`, or served one by one with `engram serve` at `addresses` (the map the
    shards publish then names them). Returns a summary (rows per shard, table steps).
    """
    manifest = load_manifest(source)
    n_src = manifest["num_shards"]
    old_map = ShardMap.from_json(json.dumps(manifest["shard_map"]))
    m_new = shards or n_src
    if m_new < 1:
        raise ConfigError(f"--shards {m_new}: restore onto at least 1 shard")
    if addresses is not None and len(addresses) != m_new:
        raise ConfigError(f"{len(addresses)} addresses for {m_new} shards; give one per shard")
    slots = num_slots or (old_map.num_slots if old_map.num_slots > 1 else DEFAULT_SLOTS)
    layout = uuid.uuid4().hex
    new_map = ShardMap.balanced(
        addresses or [f"restored-shard-{j}" for j in range(m_new)], slots, version=1, layout=layout
    )
    if os.path.exists(data_root) and os.listdir(data_root):
        raise ConfigError(f"{data_root} is not empty; restore into a new or empty directory")
    # The registry takes the same lock, so no cluster opens the directory half restored.
    with lock_data_root(data_root, {"restore": os.path.abspath(source)}):
        specs = [TableConfig.from_dict(d) for d in manifest["tables"].values()]
        steps = manifest.get("steps", {})
        template = ShardConfig(data_dir="-")
        dests = [
            Shard(
                dataclasses.replace(
                    template,
                    data_dir=os.path.join(data_root, f"shard-{j}"),
                    map_size=map_size or template.map_size,
                )
            )
            for j in range(m_new)
        ]
        rows_per_shard = [0] * m_new
        try:
            for spec in specs:
                for d in dests:
                    d.create_table(spec)
                for i in range(n_src):
                    with open_snapshot_shard(source, i) as src:
                        if spec.name not in {t.name for t in src.tables()}:
                            continue
                        mask = owned_mask(src.shard_state(), old_map.num_slots)
                        for ids, rec, _ in src.export_rows(spec.name, mask, batch_rows):
                            owner = new_map.shard_of(spec.name, ids)
                            for j in np.unique(owner):
                                sel = owner == j
                                rows_per_shard[j] += dests[j].import_rows(
                                    spec.name, ids[sel], np.ascontiguousarray(rec[sel]), 0
                                )
                step = int(steps.get(spec.name, 0))
                for (
                    d
                ) in dests:  # every shard continues from the table's step (Adam bias correction)
                    d.import_rows(
                        spec.name,
                        np.empty(0, np.int64),
                        np.empty((0, d.record_bytes(spec.name)), np.uint8),
                        step,
                    )
            if m_new > 1 or addresses:
                for j, d in enumerate(dests):
                    d.set_shard_state(
                        ShardStateInfo(
                            shard_index=j,
                            map_version=new_map.version,
                            num_slots=slots,
                            owned=new_map.owned_mask(j),
                            layout=layout,
                            shard_map_json=new_map.to_json() if addresses else "",
                        )
                    )
        finally:
            for d in dests:
                d.close()
        # The cluster registry's own layout file (ops/layout.py): `engram cluster up --data
        # <data_root>` reopens the restored shards as a cluster.
        write_layout(
            data_root,
            ClusterLayout(
                layout=layout,
                name="engram",
                shard_map=new_map,
                placement={},
                tables={s.name: s.to_dict() for s in specs},
                restored_from=os.path.abspath(source),
            ),
        )
        return {
            "data_root": os.path.abspath(data_root),
            "shards": m_new,
            "num_slots": slots,
            "layout": layout,
            "rows_per_shard": rows_per_shard,
            "steps": steps,
            "tables": [s.name for s in specs],
            "from_snapshot": manifest["snapshot_id"],
        }
