"""``python -m genserve [--config PATH]``: load the configuration, then serve with uvicorn (API process)."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import TYPE_CHECKING

import uvicorn

from genserve import __version__
from genserve.config import ConfigError, load_config, resolve_config_path

if TYPE_CHECKING:
    from genserve.supervisor import WorkerTarget

log = logging.getLogger("genserve")


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="genserve", description="Serve FLUX.1-dev from a pool of GPU workers.")
    parser.add_argument(
        "--config",
        metavar="PATH",
        help="YAML config file (default: $GENSERVE_CONFIG, else ./config.yaml when present, else built-in defaults)",
    )
    parser.add_argument("--version", action="version", version=f"genserve {__version__}")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None, worker_target: WorkerTarget | None = None) -> int:
    """Serve. ``worker_target`` replaces the worker process's entry point (fault-injection tests only)."""
    args = _parse_args(argv)
    try:
        path = resolve_config_path(args.config)
        config = load_config(path)
    except ConfigError as exc:
        print(f"genserve: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=config.server.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    log.info("genserve %s; config: %s", __version__, path or "built-in defaults")

    from genserve.app import create_app

    try:
        app = create_app(config, worker_target=worker_target)
    except ConfigError as exc:  # e.g. an unreadable auth.keys_file
        print(f"genserve: {exc}", file=sys.stderr)
        return 2
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=config.server.host,
            port=config.server.port,
            log_level=config.server.log_level,
            timeout_graceful_shutdown=int(config.server.shutdown_grace_s) or None,
            access_log=config.server.log_level == "debug",
        )
    )
    server.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
