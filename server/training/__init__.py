"""The federation's loops and what they call: the synchronous rounds (rounds.py), the buffered
asynchronous versions (buffered.py), the guarded Flower strategies, the update checks, the
starting weights and the seeded client sampling."""
