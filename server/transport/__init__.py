"""The server's side of the wire: Flower's gRPC wiring, each client stream's seat, admission
(capacity, per-certificate bounds, revocation) and the sites' join checks."""
