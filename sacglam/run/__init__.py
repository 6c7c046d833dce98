"""Building and running a training run: builders, the shared harness, the helpers scripts use."""
