"""The service, in layers that import one way only (tests/test_layers.py checks it):

    app, server, predict                 the entry points
    web/, protocols/                     front ends: HTTP (FastAPI), the Open Inference Protocol
    pipeline, limits                     a request's steps and what it may hold
    runtime/, media/, batching/,         engines and the served versions; pixels in and out;
    settings                             continuous batching (generic: imports nothing here);
                                         the one settings class
    errors, auth, telemetry/             the one error, the API key check, the request clock,
                                         metrics, logs, traces

No torch anywhere below: the GPU image carries none.
"""
