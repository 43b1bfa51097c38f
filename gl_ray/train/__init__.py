"""Training: the loop (Ray-free), checkpoints, outputs, and the Ray Train layers."""
