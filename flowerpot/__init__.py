"""Flowerpot's command line (cli.py), the local launcher behind `run-local` and the tests
(launcher.py), and the operator's certificate tooling (certs.py)."""
