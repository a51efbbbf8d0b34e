"""Code that the Flowerpot server and clients both import: settings, errors, logging, model files, TLS files."""
