"""Code that the Flowerpot server and clients both use: settings, errors, logging, data."""
