"""The workflow's own entry points: config validation, the scripts' runner, the run guard and the docs."""
