"""Running a training job: in this process for one trainer, else data-parallel on Ray Train
(TorchTrainer, DDP: gloo on CPU, nccl on GPU). Ray is imported only when Ray Train runs."""

from __future__ import annotations

import dataclasses
import json
import uuid
from pathlib import Path

import torch

from trainer.config import TrainConfig, default_out
from trainer.loop import train_worker


def train(cfg: TrainConfig) -> dict:
    """Run training: in this process for one trainer, else (or with ray_train) on Ray Train."""
    cfg.validate()
    if cfg.trainers > 1 or cfg.ray_train:
        return run_ray_train(cfg)
    return train_worker(cfg)


class _SummarySink:
    """A tiny actor that receives rank 0's summary: works across nodes without shared storage
    (Ray Train's Result.metrics only carries metrics reported with a checkpoint)."""

    def __init__(self) -> None:
        self.summary: str | None = None

    def put(self, summary: str) -> None:
        self.summary = summary

    def get(self) -> str | None:
        return self.summary


def _ray_worker(loop_config: dict) -> None:
    """Ray Train's per-worker entry: rank and device from the train context."""
    import ray
    import ray.train
    import ray.train.torch

    cfg = TrainConfig.from_dict(loop_config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if cfg.device != "cpu" else torch.device("cpu")
    summary = train_worker(cfg, rank, world, device)  # rank 0 prints a line per log window
    if rank == 0:
        sink = ray.get_actor(loop_config["sink"], namespace=loop_config["namespace"])
        ray.get(sink.put.remote(json.dumps(summary, default=str)))
    ray.train.report({"step": summary["steps"]})


def run_ray_train(cfg: TrainConfig) -> dict:
    """Data-parallel training over cfg.trainers Ray Train workers (DDP: gloo on CPU, nccl on GPU).

    Needs a connected Ray (ray.init done by the caller). Workers need one GPU each when the
    cluster has GPUs (or --device cuda), else one CPU, plus cfg.trainer_resource if set.
    Returns rank 0's summary.
    """
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    use_gpu = cfg.device == "cuda" or (cfg.device == "auto" and _cluster_has_gpus())
    resources: dict[str, float] = {"GPU": 1} if use_gpu else {"CPU": 1}
    if cfg.trainer_resource:
        resources[cfg.trainer_resource] = 1
    out = Path(cfg.out or default_out()).resolve()
    cfg = dataclasses.replace(
        cfg, out=str(out), progress=False, device="cuda" if use_gpu else "cpu"
    )
    name = f"engram-summary-{uuid.uuid4().hex[:8]}"
    namespace = ray.get_runtime_context().namespace
    sink = ray.remote(_SummarySink).options(name=name, namespace=namespace, num_cpus=0).remote()
    try:
        trainer = TorchTrainer(
            _ray_worker,
            train_loop_config={"cfg": cfg.to_dict(), "sink": name, "namespace": namespace},
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
            scaling_config=ScalingConfig(
                num_workers=cfg.trainers, use_gpu=use_gpu, resources_per_worker=resources
            ),
            run_config=RunConfig(name=f"engram-{out.name}", storage_path=str(out / "ray")),
        )
        result = trainer.fit()
        if result.error:
            raise result.error
        summary = ray.get(sink.get.remote())
    finally:
        ray.kill(sink)
    if summary is None:
        raise RuntimeError("Ray Train finished without a summary from rank 0; see the worker logs")
    return json.loads(summary)


def _cluster_has_gpus() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0
