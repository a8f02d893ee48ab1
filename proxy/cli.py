"""``memcube-proxy serve [--config FILE] [--host H] [--port P]``,
``memcube-proxy keys hash|new`` for API keys,
``memcube-proxy adapters make-test|inspect`` for LoRA adapter files, and
``memcube-proxy doctor [--config FILE]`` to check the embedded models on this machine."""

from __future__ import annotations

import argparse
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
    doctor = sub.add_parser("doctor", help="Check that the embedded models run on this machine.",
                            description="Print the platform, the CPU's features, llama.cpp's "
                            "build and the settings of each embedded model, then self-test them "
                            "in a child process (embed a batch; prefill 1,000 tokens and generate "
                            "16). Exits 1 naming the step that failed.")
    doctor.add_argument("--config", type=Path, help="YAML config file whose models to check "
                        "(default: the built-in defaults).")
    doctor.add_argument("--timeout", type=float, default=600.0,
                        help="Seconds the self-test may take (default 600).")
    keys = sub.add_parser("keys", help="API keys for the config file.")
    key_verbs = keys.add_subparsers(dest="verb", required=True)
    hash_ = key_verbs.add_parser("hash", help="Print the `sha256:...` form of a key, which "
                                 "the config may hold instead of the key.")
    hash_.add_argument("key", nargs="?", help="The key (default: read one per line from "
                       "stdin, which keeps it out of the shell history).")
    key_verbs.add_parser("new", help="Print a new random key and its hashed form.")
    adapters = sub.add_parser("adapters", help="LoRA adapter files for the local model.")
    verbs = adapters.add_subparsers(dest="verb", required=True)
    make = verbs.add_parser("make-test", help="Write a small random LoRA that visibly changes "
                            "the model's greedy output (no training needed).")
    make.add_argument("out", type=Path, metavar="OUT.gguf")
    make.add_argument("--rank", type=int, default=8)
    make.add_argument("--seed", type=int, default=0)
    make.add_argument("--strength", type=float, default=1.0, help="Size of the change.")
    make.add_argument("--base", type=Path, help="Base model GGUF (default: the embedded model).")
    look = verbs.add_parser("inspect", help="Print what a LoRA GGUF adapts and whether it fits "
                            "the base model.")
    look.add_argument("file", type=Path)
    look.add_argument("--base", type=Path, help="Base model GGUF (default: the embedded model).")
    return parser


def adapters(args: argparse.Namespace) -> int:
    from memory.parametric import AdapterError, inspect, make_test_adapter
    from proxy.backends.llamacpp import default_model_path

    base = args.base or default_model_path()
    try:
        if args.verb == "make-test":
            info = make_test_adapter(base, args.out, rank=args.rank, seed=args.seed,
                                     strength=args.strength)
        else:
            info = inspect(args.file, base)
    except AdapterError as exc:
        print(f"memcube-proxy: {exc}", file=sys.stderr)
        return 2
    print(info.describe())
    return 0 if info.fits else 1


def keys(args: argparse.Namespace) -> int:
    from proxy.admin.keys import hashed_form, new_key

    if args.verb == "new":
        key = new_key()
        print(f"key:    {key}\nconfig: {hashed_form(key)}")
        return 0
    given = [args.key] if args.key is not None else [line.strip() for line in sys.stdin]
    given = [k for k in given if k]
    if not given:
        print("memcube-proxy: no key given (pass one, or one per line on stdin)",
              file=sys.stderr)
        return 2
    for key in given:
        print(hashed_form(key))
    return 0


def main(argv: list[str] | None = None) -> int:
    offline.configure()
    args = build_parser().parse_args(argv)
    if args.command == "adapters":
        return adapters(args)
    if args.command == "keys":
        return keys(args)
    from proxy.settings import ConfigError, load_settings

    overrides = {} if args.command == "doctor" else {
        "host": args.host, "port": args.port, "log_level": args.log_level}
    try:
        settings = load_settings(args.config, **overrides)
    except ConfigError as exc:
        print(f"memcube-proxy: {exc}", file=sys.stderr)
        return 2
    if args.command == "doctor":
        from proxy.doctor import doctor

        return doctor(settings, timeout=args.timeout)
    return serve(settings)


def serve(settings: object) -> int:
    import uvicorn

    from proxy import startup
    from proxy.app import create_app
    from proxy.observability import setup_logging
    from proxy.settings import Settings

    assert isinstance(settings, Settings)
    setup_logging(settings.log_level)
    # Checked before any model loads; the lock is held until the process ends.
    try:
        lock = startup.lock_data_dir(settings.data_dir)
        startup.check_port(settings.host, settings.port)
        startup.check_files(settings)
        app = startup.OneLineStartup(create_app(settings))
    except (startup.StartupError, ValueError, FileNotFoundError) as exc:
        for line in str(exc).splitlines():
            print(f"memcube-proxy: {line}", file=sys.stderr)
        return 2
    try:
        uvicorn.run(app, host=settings.host, port=settings.port, log_config=None,
                    access_log=False, log_level=settings.log_level)
    except SystemExit:  # uvicorn's exit when start-up failed
        if app.error is None:
            raise
        return 2
    finally:
        lock.release()
    return 0


if __name__ == "__main__":
    sys.exit(main())
