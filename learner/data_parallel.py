"""Data parallelism for the learner: the same training on N processes, each on a share of the
data, gradients averaged every step (PyTorch DDP, set up by HF Accelerate).

    world = N processes (`accelerate launch --num_processes N`: gloo on CPUs, NCCL on GPUs)
    each step: rank k computes the loss on its share of the batch → backward → DDP averages
               the gradients over the ranks → every rank takes the same optimiser step, so
               the weights stay equal (DDP broadcasts rank 0's weights once at the start)

`DataParallel` is what the trainers see of it: who they are (rank, world), `prepare` (wrap
a module in DDP), the collectives they need for figures that span the ranks (`gather`,
`mean`), and `gradient_spread`, the check that the gradients are the same on every rank
after the all-reduce. `SINGLE` is the one-process case: every call is the identity, so the
trainers have one code path and one process runs exactly as before.

The reward model splits each *global* batch over the ranks and weights each rank's loss so
that DDP's average is the one-process gradient (reward_model.py); PPO gives each rank its
own rollouts (policy_trainer.py).

Sharded (FSDP2, an accelerate config with `distributed_type: FSDP`, configs/accelerate/
fsdp.yaml): each rank keeps 1/N of every weight, gradient and optimiser state; a unit (one
transformer layer) is all-gathered for its forward and backward and resharded after, the
gradients reduce-scattered. What the training forward does not cover reads the weights
whole inside `whole()` (sampling, scoring passes, evaluation: any submodule, any number
of times per rank), and the trained module comes back unsharded (`unsharded`) for
what rank 0 does alone with it (checks, saving). accelerate turns FSDP on for accelerators
only; on CPUs (gloo) `from_accelerator` turns it on the same way from the variables
`accelerate launch` set, so the same config file runs, and is tested, here.
DeepSpeed is refused: its engine owns backward and the optimiser step, which the trainers
take themselves.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

# accelerate's DistributedType names under which the trainers run: DDP on GPUs or CPUs, and
# FSDP (version 2) on either.
DDP_KINDS = ("NO", "MULTI_GPU", "MULTI_CPU")
SHARDED_KIND = "FSDP"


@dataclass
class DataParallel:
    accelerator: Any = None  # accelerate.Accelerator, None for one process
    rank: int = 0
    world: int = 1
    sharded: bool = False  # FSDP: each rank holds a shard of every weight

    @classmethod
    def from_accelerator(cls, accelerator: Any) -> DataParallel:
        kind = str(accelerator.distributed_type).rsplit(".", 1)[-1]
        if kind == "MULTI_CPU" and os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
            _fsdp_on_cpus(accelerator)
            kind = SHARDED_KIND
        if kind == SHARDED_KIND and not accelerator.is_fsdp2:
            raise ValueError("the learner shards with FSDP version 2: set fsdp_version: 2 in the "
                             "accelerate config's fsdp_config (configs/accelerate/fsdp.yaml)")
        if kind not in (*DDP_KINDS, SHARDED_KIND):
            raise ValueError(f"the learner trains data-parallel with DDP ({', '.join(DDP_KINDS)}"
                             f") or FSDP version 2, not {kind}: DeepSpeed's engine would own "
                             "the backward and optimiser steps the trainers take themselves; "
                             "use configs/accelerate/multi-gpu.yaml or fsdp.yaml")
        return cls(accelerator, accelerator.process_index, accelerator.num_processes,
                   sharded=kind == SHARDED_KIND)

    @property
    def is_main(self) -> bool:
        """The process that writes artefacts, checkpoints and the registry."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def shard(self, items: list[Any]) -> list[Any]:
        """This rank's share of a list every rank holds in the same order: items k, k+N, …"""
        return items[self.rank::self.world]

    def prepare(self, module: nn.Module) -> nn.Module:
        """The module wrapped for training: in DDP (its gradients averaged over the ranks in
        backward), or sharded in place by FSDP (one unit per transformer layer, the
        classes the models name in `_no_split_modules`); itself for one process. Build the
        optimiser after this, from the returned module's parameters (FSDP replaces them).
        Call the wrapper for the training forward, so that DDP or FSDP sees it; other
        passes go to the module itself (inside `whole()` when sharded)."""
        if not self.active:
            return module
        if self.sharded:
            from accelerate.utils.fsdp_utils import fsdp2_prepare_model

            if getattr(module, "_no_split_modules", None) is None:
                module._no_split_modules = sorted({  # type: ignore[assignment]
                    name for m in module.modules() for name in
                    (getattr(m, "_no_split_modules", None) or [])})
            return fsdp2_prepare_model(self.accelerator, module)
        return self.accelerator.prepare_model(module)

    @contextmanager
    def whole(self, module: nn.Module) -> Iterator[None]:
        """Inside, every rank holds `module`'s weights whole (FSDP: each unit all-gathered
        once and not resharded after a forward), so a pass other than the training forward
        may call any submodule, any number of times on one rank (sampling stops when its
        own answers end: no collective may run per token). Every rank must enter together.
        Costs one whole copy of the weights while inside; a no-op unless sharded."""
        if not self.sharded:
            yield
            return
        from torch.distributed.fsdp import FSDPModule

        units = [m for m in module.modules() if isinstance(m, FSDPModule)]
        # FSDP makes the first unit whose forward runs the root; before the first training
        # forward that would be a layer called here: settle the root first (no public call).
        module._get_fsdp_state()._lazy_init()  # type: ignore[operator]
        for unit in units:
            unit.set_reshard_after_forward(False, recurse=False)
            unit.unshard()
        try:
            yield
        finally:
            reshard = self.accelerator.state.fsdp_plugin.reshard_after_forward
            for unit in units:
                unit.reshard()
                # the root keeps its weights between forward and backward (FSDP's default)
                unit.set_reshard_after_forward(bool(reshard) and unit is not module,
                                               recurse=False)

    def unsharded(self, module: nn.Module, build: Callable[[], nn.Module]) -> nn.Module:
        """The trained module with whole weights, for what rank 0 does with it alone: itself
        unless sharded; under FSDP, on rank 0, `build()` (the same module, freshly loaded)
        given the trained values of every trainable weight and buffer (the other ranks,
        which do nothing more with it, get the sharded one). Every rank must call it."""
        if not self.sharded:
            return module
        trained = {name for name, p in module.named_parameters() if p.requires_grad}
        trained |= {name for name, _ in module.named_buffers()}
        state = whole_tensors({k: v for k, v in module.state_dict().items() if k in trained})
        if not self.is_main:
            return module
        fresh = build()
        missing = set(state) - set(fresh.state_dict())
        if missing:
            raise RuntimeError(f"the rebuilt module lacks trained weights {sorted(missing)[:3]}")
        fresh.load_state_dict(state, strict=False)
        return fresh

    def gather(self, values: list[Any]) -> list[Any]:
        """Every rank's list, concatenated in rank order (on every rank)."""
        if not self.active:
            return list(values)
        from accelerate.utils import gather_object

        return gather_object(list(values))

    def total(self, value: torch.Tensor) -> torch.Tensor:
        """The sum over the ranks of a tensor (float64 sums for statistics stay exact), on
        the tensor's own device (NCCL reduces on the GPU only: moved there and back)."""
        if not self.active:
            return value
        summed = self.accelerator.reduce(value.to(self.accelerator.device), reduction="sum")
        return summed.to(value.device)

    def share(self, value: Any) -> Any:
        """Rank 0's `value` on every rank (what each rank would read itself, e.g. the votes
        from a database that may change between two reads, must be the same on all)."""
        if not self.active:
            return value
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([value if self.is_main else None])[0]

    def mean(self, value: float) -> float:
        if not self.active:
            return value
        return self.total(torch.tensor(value, dtype=torch.float64)).item() / self.world

    def masked_moments(self, x: torch.Tensor, mask: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(mean, unbiased variance) of x's masked entries over every rank's x, for
        `ppo.whiten`; None for one process (whiten then uses x's own)."""
        if not self.active:
            return None
        n = self.total(mask.sum().double())
        mean = self.total((x * mask).sum().double()) / n
        squares = self.total(((x - mean) ** 2 * mask).sum().double())
        return mean.to(x.dtype), (squares / (n - 1).clamp(min=1)).to(x.dtype)

    def average_gradients(self, params: list[torch.Tensor]) -> None:
        """Average the gradients of parameters DDP does not own (kept outside the module)."""
        if not self.active:
            return
        for p in params:
            if p.grad is not None:
                p.grad.copy_(self.total(p.grad) / self.world)

    def gradient_spread(self, params: list[torch.Tensor]) -> float | None:
        """max |g_k − g_0| over the ranks and every gradient entry: 0 (to rounding) when the
        ranks will take the same step. 0.0 for one process; None when sharded (FSDP's
        reduce-scatter leaves one copy of each gradient entry, on the rank that owns it)."""
        if not self.active:
            return 0.0
        if self.sharded:
            return None
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                          .float() for p in params])
        every = self.accelerator.gather(flat[None])  # (world, n)
        return (every - every[0]).abs().max().item()

    def wait(self) -> None:
        """Every rank reaches this line before any goes on."""
        if self.active:
            self.accelerator.wait_for_everyone()


def whole_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict with each FSDP-sharded tensor (DTensor) gathered whole, the others as
    they are: what a file or a plain module can take. Gathering is a collective: under FSDP
    every rank calls this with the same keys."""
    from torch.distributed.tensor import DTensor

    return {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in tensors.items()}


def _fsdp_on_cpus(accelerator: Any) -> None:
    """accelerate turns FSDP on for accelerators only (state.py). On CPUs, with the FSDP
    variables `accelerate launch` exports from the config, turn it on the same way: the
    plugin reads them, and accelerate's FSDP2 preparation runs on a CPU mesh over gloo."""
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin()
    accelerator.state.distributed_type = DistributedType.FSDP


SINGLE = DataParallel()
