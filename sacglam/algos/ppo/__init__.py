"""PPO-GLAM over candidate sets: the on-policy baseline."""
