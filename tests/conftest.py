"""Test layout: one folder per layer (engine, rpc, ops, cluster, trainer, cli, benchmarks), plus
the layering and packaging checks at the top. Server fixtures live in tests/servers.py."""

pytest_plugins = ["tests.servers"]
