"""The Ray layer: shards as Ray actors on store nodes, the registry that places them and reshards
live, and the EngramCluster facade. Needs the `cluster` extra (Ray)."""

import importlib.util as _util

if _util.find_spec("ray") is None:
    raise ImportError(
        "the cluster package needs Ray, which this environment lacks; install the cluster "
        "extra: pip install 'engram[cluster]'",
        name="ray",
    )
