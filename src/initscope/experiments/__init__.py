"""Training experiments: data, models, one training loop, sweeps, the results store and the report."""
