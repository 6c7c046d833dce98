"""The algorithms: each a config, its losses and a learner that the shared harness drives."""
