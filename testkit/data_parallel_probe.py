"""Run under `accelerate launch --num_processes 2`: shows that `DataParallel.gradient_spread`
sees gradients that differ across the ranks, and that after a DDP backward (through
`DataParallel.prepare`) they are the same on every rank and equal to the one-process
gradient of all the ranks' data together; and that `masked_moments` over the ranks are
those of all the data. Rank 0 prints one JSON line with the figures."""

from __future__ import annotations

import json

import torch
from accelerate import Accelerator
from torch import nn

from learner import ppo
from learner.data_parallel import DataParallel

SEED = 0
ROWS_PER_RANK = 4


def main() -> None:
    parallel = DataParallel.from_accelerator(Accelerator(cpu=True))
    torch.manual_seed(SEED)
    model = nn.Linear(3, 1)
    data = torch.randn(ROWS_PER_RANK * parallel.world, 3, generator=torch.Generator()
                       .manual_seed(SEED + 1))
    mine = data[parallel.rank::parallel.world]  # each rank its own rows

    # 1. Plain backward on the rank's own rows: the gradients differ across the ranks.
    model(mine).pow(2).mean().backward()
    local_spread = parallel.gradient_spread(list(model.parameters()))

    # 2. The same through DDP: averaged in backward, the same on every rank ...
    model.zero_grad()
    wrapped = parallel.prepare(model)
    wrapped(mine).pow(2).mean().backward()
    ddp_spread = parallel.gradient_spread(list(model.parameters()))

    # 3. ... and the one-process gradient of every rank's rows (equal shares: mean of means).
    reference = nn.Linear(3, 1)
    reference.load_state_dict(model.state_dict())
    reference(data).pow(2).mean().backward()
    to_one_process = max((p.grad - q.grad).abs().max().item()
                         for p, q in zip(model.parameters(), reference.parameters(), strict=True))

    # 4. Whitening statistics over every rank's rows = those of all the rows in one process.
    generator = torch.Generator().manual_seed(SEED + 2)
    x = torch.randn(ROWS_PER_RANK * parallel.world, 5, generator=generator)
    mask = (torch.rand(x.shape, generator=generator) > 0.3).float()
    mean, var = parallel.masked_moments(x[parallel.rank::parallel.world],
                                        mask[parallel.rank::parallel.world])
    moments_error = max((mean - ppo.masked_mean(x, mask)).abs().item(),
                        (var - ppo.masked_var(x, mask)).abs().item())
    if parallel.is_main:
        print(json.dumps({"world": parallel.world, "local_spread": local_spread,
                          "ddp_spread": ddp_spread, "ddp_vs_one_process": to_one_process,
                          "moments_vs_one_process": moments_error}))
    parallel.wait()


if __name__ == "__main__":
    main()
