"""Stage 3, distillation: the loss functions and the table of methods."""
