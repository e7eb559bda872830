"""Stage 5, training: the loop, the optimiser, resumable state, and one training job."""
