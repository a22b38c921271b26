"""The HTTP routes, one module per surface; each reaches the pipeline through `deps`."""
