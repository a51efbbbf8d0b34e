"""The Flowerpot client: claims a shard, trains on it, and talks to the server over gRPC."""
