"""The gRPC metadata a Flowerpot client sends when it joins (both wiring modules use it)."""

CLIENT_NAME_KEY = "flowerpot-client"  # the name the client gives itself
# Client authentication: proof field -> metadata key (`-bin` keys carry bytes: the PEM has newlines)
PROOF_KEYS = {"cert": "flowerpot-cert-bin", "time": "flowerpot-time", "signature": "flowerpot-signature"}
