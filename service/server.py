"""The server process: uvicorn with segserve's HTTP protocol, and a shutdown that drains first.

A balancer (haproxy, a Kubernetes Service) keeps sending a replica work until its health
check sees it go unready, and may reuse keep-alive connections it already holds. A replica
that stops listening at the first SIGTERM loses what arrives in that gap. So the first
SIGTERM starts a drain: /readyz answers 503 at once, every response says
`Connection: close`, and requests are served as usual for `shutdown_drain_s` seconds, long
enough for the balancer to mark the replica down. Only then does uvicorn's own graceful
shutdown run: stop listening, finish what is in flight, drain the batchers.
SIGINT (Ctrl-C), a second signal, or a drain of 0 s shut down at once.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

import uvicorn

from segserve.service.app import create_app
from segserve.service.settings import Settings
from segserve.service.web.protocol import guarded_protocol

log = logging.getLogger("segserve")


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose first SIGTERM drains (see the module's docstring)."""

    def __init__(self, config: uvicorn.Config, start_drain, drain_s: float) -> None:
        super().__init__(config)
        self.start_drain, self.drain_s = start_drain, drain_s
        self.draining = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig != signal.SIGTERM or self.drain_s <= 0 or self.draining:
            return super().handle_exit(sig, frame)
        self.draining = True
        self.start_drain()
        log.info("SIGTERM: unready, serving for %.1f s more, then shutting down", self.drain_s)
        timer = threading.Timer(self.drain_s, super().handle_exit, (sig, frame))
        timer.daemon = True
        timer.start()


def serve(settings: Settings, host: str, port: int) -> None:
    """Run the service on host:port until signalled."""
    app = create_app(settings, grpc_host=host)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_config=None,
        access_log=False,  # segserve.request logs each request, with its id and timings
        http=guarded_protocol(settings.max_header_bytes, settings.idle_timeout_s),
        # uvicorn's own graceful shutdown: in-flight requests (queued ones included) get up
        # to their deadline; then the app's shutdown drains the batchers.
        timeout_graceful_shutdown=int(settings.request_timeout_s) + 1,
    )
    DrainingServer(config, app.state.service.registry.drain, settings.shutdown_drain_s).run()
