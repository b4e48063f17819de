"""``python -m genserve [--config PATH]``: load the configuration, then serve with uvicorn (API process).
``python -m genserve plan --memory-gb N``: print the memory plan for an N-GB card instead (genserve.plan_cli).

Stopping: the first SIGTERM or SIGINT starts a drain (genserve.service) while the HTTP server keeps answering —
new jobs get 503 with Retry-After in their route's error shape, running jobs may finish within
server.shutdown_grace_s, the rest fail with JSON answers — and only then does uvicorn stop and the workers exit.
A second signal skips what is left of the wait. The exit status is 0, or EXIT_WORKERS_FAILED when a worker slot
spent its restart budget under workers.on_budget_spent: exit.
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
from types import FrameType
from typing import TYPE_CHECKING

import uvicorn

from genserve import __version__, logs
from genserve.config import Config, ConfigError, load_config, resolve_config_path

if TYPE_CHECKING:
    from genserve.service import Service
    from genserve.supervisor import WorkerTarget

log = logging.getLogger("genserve")

# After the drain every job has its answer; this is how long uvicorn then waits for those answers to be written.
RESPONSE_FLUSH_S = 3


class GenServeServer(uvicorn.Server):
    """uvicorn's server with a drain before it stops (uvicorn alone stops listening at once)."""

    def __init__(self, config: uvicorn.Config, service: Service) -> None:
        super().__init__(config)
        self.service = service
        self._stop_started = False
        service.stop.install(self.begin_stop)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Not uvicorn's: it would stop listening at once, and re-raise the signal at exit (exit status 143).
        if self._stop_started:
            log.warning("second stop signal: not waiting any longer")
            self.should_exit = self.force_exit = True
            return
        self.service.stop.request(f"received signal {sig}")

    def begin_stop(self) -> None:
        if self._stop_started:
            return
        self._stop_started = True
        threading.Thread(target=self._drain_then_exit, name="genserve-drain", daemon=True).start()

    def _drain_then_exit(self) -> None:
        try:
            self.service.drain()
        finally:
            self.should_exit = True


def build_server(config: Config, worker_target: WorkerTarget | None = None) -> GenServeServer:
    """The app and the HTTP server that serves it, not started yet (raises ConfigError). ``server.run()`` serves
    until a stop; the tests also run it on a thread of their own process (tests/server.py)."""
    from genserve.app import create_app
    from genserve.edge import http_protocol

    app = create_app(config, worker_target=worker_target)
    return GenServeServer(
        uvicorn.Config(
            app,
            host=config.server.host,
            port=config.server.port,
            http=http_protocol(config.server),
            log_level=config.server.log_level,
            timeout_graceful_shutdown=RESPONSE_FLUSH_S,
            # genserve.request_log writes the access log (with request ids and key names); uvicorn's lines go to
            # the root handler that genserve.logs set up, in the same format.
            access_log=False,
            log_config=None,
        ),
        app.state.service,
    )


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="genserve",
        description="Serve FLUX.1-dev from a pool of GPU workers. "
        "'genserve plan --memory-gb N' prints the memory plan for an N-GB card instead.",
    )
    parser.add_argument(
        "--config",
        metavar="PATH",
        help="YAML config file (default: $GENSERVE_CONFIG, else ./config.yaml when present, else built-in defaults)",
    )
    parser.add_argument(
        "--role",
        choices=("all", "api", "worker"),
        help="cluster role (overrides cluster.role; api and worker need cluster.backend redis): api serves HTTP only, "
        "worker runs workers fed from the cluster queue, all is both",
    )
    parser.add_argument("--version", action="version", version=f"genserve {__version__}")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None, worker_target: WorkerTarget | None = None) -> int:
    """Serve (or ``plan``: see genserve.plan_cli). ``worker_target`` replaces the worker process's entry point
    (fault-injection tests only)."""
    arguments = sys.argv[1:] if argv is None else argv
    if arguments[:1] == ["plan"]:
        from genserve import plan_cli

        return plan_cli.main(arguments[1:])
    args = _parse_args(arguments)
    try:
        path = resolve_config_path(args.config)
        config = load_config(path, role=args.role)
    except ConfigError as exc:
        print(f"genserve: {exc}", file=sys.stderr)
        return 2
    logs.configure(config.server.log_level, config.server.log_format, "genserve-api")
    log.info("genserve %s; config: %s", __version__, path or "built-in defaults")
    if config.workers.start_method == "forkserver" and config.runs_workers:  # an API node has no workers
        from genserve import forkserver

        forkserver.start_early()  # its imports now run alongside ours below

    try:
        server = build_server(config, worker_target)
    except ConfigError as exc:  # e.g. an unreadable auth.keys_file
        print(f"genserve: {exc}", file=sys.stderr)
        return 2
    server.run()
    service = server.service
    if service.stop.exit_code:
        print(f"genserve: exiting with status {service.stop.exit_code}: {service.stop.reason}", file=sys.stderr)
    return service.stop.exit_code


if __name__ == "__main__":
    sys.exit(main())
