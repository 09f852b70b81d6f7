"""Run under `accelerate launch --num_processes 2`: shows that `DataParallel.gradient_spread`
sees gradients that differ across the ranks, and that after a DDP backward (through
`DataParallel.prepare`) they are the same on every rank and equal to the one-process
gradient of all the ranks' data together; that `masked_moments` over the ranks are those
of all the data; and the reward model's split of a batch the same. Rank 0 prints one JSON
line with the figures."""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn

from learner import ppo
from learner.data_parallel import DataParallel
from learner.reward_model import rank_share

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

    # 5. The reward model's split of a batch (reward_model.rank_share): uneven (5 rows: 3 on
    #    rank 0, 2 on rank 1) and with a rank holding none (1 row): DDP's gradient of the
    #    weighted sums = the one-process gradient of the batch's mean loss.
    rows = torch.randn(6, 3, generator=torch.Generator().manual_seed(SEED + 3))
    items = [[i] for i in range(len(rows))]  # distinct objects, owned as the RM owns pairs
    mine = {id(item) for item in items[parallel.rank::parallel.world]}
    weighting_error = 0.0
    for batch in (items[:5], items[5:]):
        torch.manual_seed(SEED)
        ranked, alone = nn.Linear(3, 1), nn.Linear(3, 1)
        alone.load_state_dict(ranked.state_dict())
        chunk, share = rank_share(batch, mine, items[parallel.rank], parallel.world)
        wrapped = parallel.prepare(ranked)  # kept: DDP averages in backward while it lives
        # −log σ(r): the Bradley–Terry loss of a pair whose winner scored r more
        loss = F.softplus(-wrapped(rows[[i for [i] in chunk]])).sum() * share
        loss.backward()
        F.softplus(-alone(rows[[i for [i] in batch]])).mean().backward()
        weighting_error = max(weighting_error, *((p.grad - q.grad).abs().max().item() for p, q
                                                 in zip(ranked.parameters(), alone.parameters(),
                                                        strict=True)))
    if parallel.is_main:
        print(json.dumps({"world": parallel.world, "local_spread": local_spread,
                          "ddp_spread": ddp_spread, "ddp_vs_one_process": to_one_process,
                          "moments_vs_one_process": moments_error,
                          "rm_split_vs_one_process": weighting_error}))
    parallel.wait()


if __name__ == "__main__":
    main()
