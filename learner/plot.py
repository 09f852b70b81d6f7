"""A PNG of one learner iteration, from the manifests: RM held-out accuracy over the reward
model's training steps, and reward and KL (with its target) over the PPO steps.

    .venv/bin/python -m learner.plot var/versions/policy-v3 --out docs/iteration.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

from learner.artifacts import read_manifest


def plot_iteration(policy_dir: Path, out: Path, rm_dir: Path | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    policy = read_manifest(policy_dir)
    rm_dir = rm_dir or policy_dir.parent / policy["rm_version"]
    rm = read_manifest(rm_dir)
    ppo_rows = policy["history"]
    rm_rows = [r for r in rm["history"] if r.get("heldout_accuracy") is not None]

    fig, (ax_rm, ax_reward, ax_kl) = plt.subplots(1, 3, figsize=(14, 4))
    ax_rm.plot([r.get("step", i + 1) for i, r in enumerate(rm_rows)],
               [r["heldout_accuracy"] for r in rm_rows], marker="o")
    ax_rm.set(title=f"{rm['id']}: held-out accuracy", xlabel="RM step", ylabel="accuracy",
              ylim=(0, 1.02))
    steps = [r["step"] for r in ppo_rows]
    ax_reward.plot(steps, [r["reward"] for r in ppo_rows], marker="o", label="rollout reward")
    ax_reward.axhline(policy["metrics"]["reward_start"], color="grey", ls=":",
                      label="eval before")
    ax_reward.axhline(policy["metrics"]["reward_end"], color="green", ls="--", label="eval after")
    ax_reward.set(title=f"{policy['id']}: normalised RM reward", xlabel="PPO step")
    ax_reward.legend(fontsize=8)
    ax_kl.plot(steps, [r["kl"] for r in ppo_rows], marker="o", color="tab:red",
               label="KL(π‖π_ref) per answer")
    ax_kl.axhline(policy["metrics"]["kl_target"], color="black", ls="--", label="target")
    ax_kl.set(title="KL to the reference (nats)", xlabel="PPO step")
    ax_kl.legend(fontsize=8)
    fig.suptitle(f"learner iteration: {policy['id']} from {policy['parent']} with {rm['id']} "
                 f"({policy['preset']} preset, {rm['data_range']['n_votes']} votes)")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("policy_dir", type=Path)
    parser.add_argument("--rm-dir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=Path("iteration.png"))
    args = parser.parse_args()
    print(plot_iteration(args.policy_dir, args.out, args.rm_dir))


if __name__ == "__main__":
    main()
