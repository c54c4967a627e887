"""torch.optim references shared by the engine's optimizer tests."""

import torch

from engram_store.engine.config import OptimizerConfig


def torch_optimizer(opt: OptimizerConfig, params):
    """The torch.optim optimizer an OptimizerConfig means (the reference the engine matches)."""
    if opt.kind == "sgd":
        return torch.optim.SGD(params, lr=opt.lr)
    if opt.kind == "adagrad":
        return torch.optim.Adagrad(
            params,
            lr=opt.lr,
            lr_decay=opt.lr_decay,
            initial_accumulator_value=opt.initial_accumulator_value,
            eps=opt.resolved_eps,
        )
    return torch.optim.SparseAdam(
        params, lr=opt.lr, betas=(opt.beta1, opt.beta2), eps=opt.resolved_eps
    )
