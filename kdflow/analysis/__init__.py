"""Stage 7, analysis: evaluation of each model, the statistics, the aggregate tables and the report."""
