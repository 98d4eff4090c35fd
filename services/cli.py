"""The `accessline` command: run one service, or the whole system on an embedded etcd;
administer pools; migrate the match history."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import grpc
from sqlalchemy.exc import SQLAlchemyError

from services.numberdistribution import cli as numbers_cli
from services.runtime import processes
from services.runtime.embedded_etcd import EmbeddedEtcd
from services.runtime.settings import ServiceSettings, SettingsError, load_settings

SERVICES = ("numberdistribution", "callmatching", "routing", "presence", "notification")


def settings_type(service: str) -> type[ServiceSettings]:
    module = importlib.import_module(f"services.{service}.settings")
    found: type[ServiceSettings] = next(
        value
        for name, value in vars(module).items()
        if name.endswith("Settings")
        and isinstance(value, type)
        and issubclass(value, ServiceSettings)
        and value is not ServiceSettings
    )
    return found


def default_port(service: str, field: str = "port") -> int:
    value: int = settings_type(service).model_fields[field].default
    return value


def serve(service: str) -> None:
    module = importlib.import_module(f"services.{service}.__main__")
    module.main()


@dataclass
class Child:
    service: str
    port: int
    metrics_port: int
    process: subprocess.Popen[bytes]


async def up(data_dir: Path, etcd_port: int, etcd_peer_port: int, host: str) -> int:
    etcd = EmbeddedEtcd(data_dir / "etcd", etcd_port, etcd_peer_port, host=host)
    print(f"starting etcd on {etcd.endpoint} (data in {etcd.data_dir})", flush=True)
    etcd.start()
    children: list[Child] = []
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await etcd.wait_ready()
        for service in SERVICES:
            port, metrics_port = default_port(service), default_port(service, "metrics_port")
            env = {
                "ACCESSLINE_ETCD_ENDPOINTS": etcd.endpoint,
                "ACCESSLINE_HOST": host,
                "ACCESSLINE_PORT": str(port),
                "ACCESSLINE_METRICS_PORT": str(metrics_port),
                "ACCESSLINE_HISTORY_DSN": os.environ.get(
                    "ACCESSLINE_HISTORY_DSN",
                    f"sqlite+aiosqlite:///{(data_dir / 'match-history.db').resolve()}",
                ),
            }
            with (data_dir / f"{service}.log").open("ab") as log:
                process = processes.spawn(f"services.{service}", env, stdout=log)
            children.append(Child(service, port, metrics_port, process))
        await asyncio.gather(
            *(processes.wait_serving(f"{host}:{c.port}", c.process, c.service) for c in children)
        )
        print("\nAccessline is up:\n")
        print(f"  {'service':<20}{'gRPC':<22}{'metrics':<30}log")
        for c in children:
            print(
                f"  {c.service:<20}{host + ':' + str(c.port):<22}"
                f"{f'http://{host}:{c.metrics_port}/metrics':<30}{data_dir / (c.service + '.log')}"
            )
        print(f"  {'etcd':<20}{etcd.endpoint:<22}{'':<30}{etcd.log_file}")
        print(
            "\nList methods with, for example:\n"
            f"  buf curl --protocol grpc --http2-prior-knowledge --list-methods http://{host}:{children[0].port}"
        )
        print("\nPress Ctrl-C to stop.", flush=True)

        async def watch_children() -> None:
            while not stop.is_set():
                for c in children:
                    if c.process.poll() is not None:
                        print(
                            f"{c.service} exited with status {c.process.returncode}; stopping",
                            flush=True,
                        )
                        stop.set()
                        return
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.5)

        await watch_children()
        return 0
    except (TimeoutError, RuntimeError) as exc:
        print(f"accessline up: {exc}", file=sys.stderr)
        return 1
    finally:
        print("stopping services...", flush=True)
        processes.stop([c.process for c in children], timeout=15.0)
        etcd.stop()
        print("stopped.", flush=True)


async def migrate_history(dsn: str | None) -> int:
    from services.callmatching.history import migrate
    from services.callmatching.settings import CallMatchingSettings

    if dsn is None:
        try:
            dsn = load_settings(CallMatchingSettings).history_dsn
        except SettingsError as exc:
            print(f"accessline history migrate: {exc}", file=sys.stderr)
            return 2
    try:
        created = await migrate(dsn)
    except (SQLAlchemyError, OSError) as exc:
        print(f"accessline history migrate: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(f"history schema up to date (created: {', '.join(created) or 'nothing'})")
    return 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="accessline", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve_p = sub.add_parser("serve", help="run one service in the foreground")
    serve_p.add_argument("service", choices=SERVICES)
    up_p = sub.add_parser("up", help="run etcd and all five services on this machine")
    up_p.add_argument("--data-dir", type=Path, default=Path(".accessline"))
    up_p.add_argument("--etcd-port", type=int, default=2379)
    up_p.add_argument("--etcd-peer-port", type=int, default=2380)
    up_p.add_argument("--host", default="127.0.0.1")
    demo_p = sub.add_parser(
        "demo", help="play the whole call-matching path against running services"
    )
    demo_p.add_argument("--calls", type=int, default=60)
    demo_p.add_argument("--agents", type=int, default=8)
    demo_p.add_argument("--concurrency", type=int, default=6)
    demo_p.add_argument("--numbers", default="127.0.0.1:50051", help="NumberDistribution address")
    demo_p.add_argument("--matching", default="127.0.0.1:50052", help="CallMatching address")
    demo_p.add_argument("--routing", default="127.0.0.1:50053", help="Routing address")
    demo_p.add_argument("--presence", default="127.0.0.1:50054", help="Presence address")
    numbers_p = sub.add_parser("numbers", help="administer access number pools")
    numbers_cli.add_arguments(numbers_p)
    history_p = sub.add_parser("history", help="the match history database")
    history_sub = history_p.add_subparsers(dest="action", required=True)
    migrate_p = history_sub.add_parser(
        "migrate", help="create what the history needs (once per deploy; safe to repeat)"
    )
    migrate_p.add_argument(
        "--dsn", help="database URL; default: ACCESSLINE_HISTORY_DSN, as CallMatching reads it"
    )
    args = parser.parse_args(argv)
    if args.command == "history":
        sys.exit(asyncio.run(migrate_history(args.dsn)))
    if args.command == "numbers":
        sys.exit(numbers_cli.run(args))
    if args.command == "demo":
        from services.demo import Addresses, play

        addresses = Addresses(args.numbers, args.matching, args.routing, args.presence)
        try:
            asyncio.run(play(addresses, args.calls, args.agents, args.concurrency))
        except grpc.aio.AioRpcError as error:
            print(
                f"accessline demo: {error.code().name}: {error.details()} (is `make up` running?)",
                file=sys.stderr,
            )
            sys.exit(1)
        return
    if args.command == "serve":
        serve(args.service)
    elif args.command == "up":
        args.data_dir.mkdir(parents=True, exist_ok=True)
        sys.exit(asyncio.run(up(args.data_dir, args.etcd_port, args.etcd_peer_port, args.host)))


if __name__ == "__main__":
    main()
