"""learner/: reward model and PPO-with-KL policy training, run as Celery tasks."""
