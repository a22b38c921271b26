"""Continuous batching and admission, generic: jobs, sizes, deadlines and a cost model, no
images, requests or metrics. Nothing here imports from the rest of segserve.service; it
reports through the `on_batch` hook."""
