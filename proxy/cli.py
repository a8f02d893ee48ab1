"""``memcube-proxy serve [--config FILE] [--host H] [--port P]``."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from memory import offline


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memcube-proxy",
                                     description="OpenAI-compatible proxy with long-term memory.")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="Run the proxy.",
                           description="Serve the OpenAI-compatible API. Settings come from "
                           "--config, overridden by MEMCUBE_* environment variables, "
                           "overridden by these flags.")
    serve.add_argument("--config", type=Path, help="YAML config file (default: built-in "
                       "defaults, same as configs/default.yaml).")
    serve.add_argument("--host", help="Address to listen on (default 127.0.0.1).")
    serve.add_argument("--port", type=int, help="Port to listen on (default 8000).")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    return parser


def main(argv: list[str] | None = None) -> int:
    offline.configure()
    args = build_parser().parse_args(argv)
    from proxy.settings import ConfigError, load_settings

    try:
        settings = load_settings(args.config, host=args.host, port=args.port,
                                 log_level=args.log_level)
    except ConfigError as exc:
        print(f"memcube-proxy: {exc}", file=sys.stderr)
        return 2
    return serve(settings)


def serve(settings: object) -> int:
    import uvicorn

    from proxy.app import create_app
    from proxy.observability import setup_logging
    from proxy.settings import Settings

    assert isinstance(settings, Settings)
    setup_logging(settings.log_level)
    try:
        app = create_app(settings)
    except (ValueError, FileNotFoundError) as exc:
        logging.getLogger("proxy").error("cannot start: %s", exc)
        return 2
    uvicorn.run(app, host=settings.host, port=settings.port, log_config=None,
                access_log=False, log_level=settings.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
