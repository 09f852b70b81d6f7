"""learner/: reward model and PPO-with-KL policy training, run as Celery tasks.

    presets         typed hyper-parameters: tiny (tests), cpu (SmolLM2, 2 cores), gpu
    sequences       the token layout shared by RM and PPO (padding, position ids, last token)
    reward_model    base trunk + LoRA + scalar head, Bradley–Terry on votes, normalised scores
    ppo             the PPO math as pure functions (rewards, GAE, losses, KL controllers)
    policy_trainer  the PPO loop: LoRA policy, value head on its trunk, π_ref = adapter off
    rollout         rollout backends: vLLM (runtime LoRA, fresh names) and transformers
    prompt_pool     shipped prompts (data/prompts.txt) + prompts users sent
    votes           where votes come from: the archive or a JSONL file
    artifacts       atomic, hashed, versioned folders (rm-vN, policy-vN)
    pipeline        one RM run / one policy run: train, publish, register (idempotent)
    tasks           Celery tasks: train_reward_model, train_policy, iterate
    trigger         start_iteration (one at a time, Redis lock), follow a task's progress
    synthetic       hidden-rule votes and a tiny SFT base, for tests and demos
    plot            PNG of an iteration (RM accuracy, reward, KL)
    sanity          empty / cut-off / repeated answers and length of a new policy and its parent
    report          the loop report: HTML + PNGs over all iterations (`arena report`)
"""
