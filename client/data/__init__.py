"""The client's data: data sets, image specs, partitioning, and the shards `prepare` writes."""
