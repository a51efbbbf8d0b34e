"""What a run leaves and shows: the round record, results and checkpoints on disk, the per-site
view and the live Prometheus metrics."""
