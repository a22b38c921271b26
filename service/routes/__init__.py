"""The HTTP routes, one module per surface; each reaches the service through `deps`."""
