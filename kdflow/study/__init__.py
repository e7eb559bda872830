"""Stage 4, the study: the config's lists expanded into one record per model, and the choice of a setting on validation."""
