"""train.py's library: the loop, checkpoints, data, and one file per training mode."""
