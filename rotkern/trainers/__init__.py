"""Stage 6: runnable experiments (``python -m rotkern.trainers <command>``). Nothing in the core imports them."""
