"""Stage 2, models: the model zoo, self-describing checkpoints, weights from outside, and what a model costs to run."""
