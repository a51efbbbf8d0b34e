"""Differential privacy on the client (DP=record): DP-SGD in place of the task's training loop,
and the shard's privacy ledger that its accountant composes (docs/privacy.md)."""
