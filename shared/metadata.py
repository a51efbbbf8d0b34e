"""The gRPC metadata a Flowerpot client sends when it joins (both wiring modules use it)."""

CLIENT_NAME_KEY = "flowerpot-client"  # the name the client gives itself (a certificate's name wins)
