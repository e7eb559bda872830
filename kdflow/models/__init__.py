"""Stage 2, models: the model zoo, self-describing checkpoints, and what a model costs to run."""
