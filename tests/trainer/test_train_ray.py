"""Two trainer workers under Ray Train (TorchTrainer, DDP over gloo) train exactly like one process
on their concatenated batch: dense weights and the store's rows match the single-process reference."""

from __future__ import annotations

import pytest

from tests.trainer.store_helpers import (
    ROOT,
    assert_matches,
    reference_run,
    shard_servers,
    tiny_config,
)
from trainer.launch import run_ray_train


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    ray.init(
        address="local",
        num_cpus=4,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}},
    )
    try:
        yield ray
    finally:
        ray.shutdown()


def test_two_trainers_sync_equal_single_process(tmp_path, local_ray):
    with shard_servers(tmp_path) as addresses:
        cfg = tiny_config(
            store=addresses,
            trainers=2,
            batch_size=2,
            prefetch_depth=1,
            device="cpu",
            out=str(tmp_path / "run"),
        )
        summary = run_ray_train(cfg)
        assert summary["trainers"] == 2 and summary["steps_run"] == cfg.steps
        # the single process sees the global batch: 2 workers x 2 sequences
        # DDP sums the two workers' dense grads in another order than one process does: float32
        # rounding (1e-7 relative) grows over 20 steps to ~1e-5 on rows of scale 1 (it depends
        # on the exact initial weights; 1e-5 was at the edge), so 3e-5 here
        assert_matches(
            summary["checkpoint"], addresses, cfg, reference_run(cfg, world=2), atol=3e-5
        )
