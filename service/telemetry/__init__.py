"""What the service tells its operators: the request clock (clock), Prometheus metrics
(prometheus) and log lines (logs). Imports nothing from the layers above it."""
