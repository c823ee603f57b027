"""boltzbench harness: budgets, records, metrics, grids, the training loop, dispatch and reporting."""
