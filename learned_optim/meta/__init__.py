"""Meta-training: tasks (optimizees), differentiable unrolls, objectives, curricula and the trainer."""
