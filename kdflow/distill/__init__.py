"""Stage 3, distillation: the loss functions, the table of methods, and the study of their settings."""
