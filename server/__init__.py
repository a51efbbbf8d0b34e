"""The Flowerpot server: admits clients, runs the rounds, aggregates, writes results (no torch)."""
