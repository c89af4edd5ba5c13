"""Stage 3: fused ops. ``reference`` holds the eager spec of each op; Triton versions sit beside it."""
