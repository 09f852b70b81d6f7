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
own rollouts (policy_trainer.py). DDP only, on CPUs or GPUs, one machine or several
(configs/accelerate/, docs/deploy.md): FSDP and DeepSpeed ZeRO shard the weights, which
PPO's rollout copy, the adapter it saves and `gradient_spread` read whole.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

# accelerate's DistributedType names under which the trainers run: DDP on GPUs or CPUs.
DDP_KINDS = ("NO", "MULTI_GPU", "MULTI_CPU")


@dataclass
class DataParallel:
    accelerator: Any = None  # accelerate.Accelerator, None for one process
    rank: int = 0
    world: int = 1

    @classmethod
    def from_accelerator(cls, accelerator: Any) -> DataParallel:
        kind = str(accelerator.distributed_type).rsplit(".", 1)[-1]
        if kind not in DDP_KINDS:
            raise ValueError(f"the learner trains data-parallel with DDP ({', '.join(DDP_KINDS)}"
                             f"), not {kind}: its trainers keep whole weights on every rank "
                             "(PPO's rollout copy and the adapter it saves read them); use an "
                             "accelerate config with distributed_type MULTI_GPU")
        return cls(accelerator, accelerator.process_index, accelerator.num_processes)

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
        """The module wrapped in DDP (its gradients averaged over the ranks in backward);
        itself for one process. Call the wrapper for the training forward, so that DDP sees
        it; everything else (no-grad passes, attributes) goes to the module itself."""
        if not self.active:
            return module
        return self.accelerator.prepare_model(module)

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

    def gradient_spread(self, params: list[torch.Tensor]) -> float:
        """max |g_k − g_0| over the ranks and every gradient entry: 0 (to rounding) when the
        ranks will take the same step. 0.0 for one process."""
        if not self.active:
            return 0.0
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                          .float() for p in params])
        every = self.accelerator.gather(flat[None])  # (world, n)
        return (every - every[0]).abs().max().item()

    def wait(self) -> None:
        """Every rank reaches this line before any goes on."""
        if self.active:
            self.accelerator.wait_for_everyone()


SINGLE = DataParallel()
