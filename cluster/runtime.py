"""Starting a Ray on this machine: the one place that does it (`engram cluster up` and
`engram train` without --address)."""

from __future__ import annotations

import logging
import os
import pathlib

import ray

log = logging.getLogger(__name__)

#: the checkout, put on the workers' PYTHONPATH so actors import it even when not pip-installed
ROOT = pathlib.Path(__file__).resolve().parents[1]


def start_local_ray(
    *, num_cpus: int, resources: dict[str, float], namespace: str, log_to_driver: bool = False
) -> str:
    """Start a Ray whose only node is this machine, on 127.0.0.1, with at least `num_cpus`
    logical CPUs (never fewer than the machine has) and the given custom resources; this process
    is connected to it and it ends with this process. Returns its GCS address."""
    ray.init(
        address="local",
        _node_ip_address="127.0.0.1",
        num_cpus=max(os.cpu_count() or 1, num_cpus),
        resources=dict(resources),
        include_dashboard=False,
        namespace=namespace,
        log_to_driver=log_to_driver,
        runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}},
    )
    address = ray.get_runtime_context().gcs_address
    log.info(
        "started a local Ray at %s (namespace %r, resources %s)", address, namespace, resources
    )
    return address
