"""The `accessline` command: run one service, or the whole system on an embedded etcd;
administer pools; migrate the match history."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import importlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TypeAlias

import grpc
from sqlalchemy.exc import SQLAlchemyError

from accessline_server.numberdistribution import cli as numbers_cli
from accessline_server.runtime import devpki, processes
from accessline_server.runtime.embedded_etcd import EmbeddedEtcd
from accessline_server.runtime.identity import ROLES_BY_NAME
from accessline_server.runtime.settings import ServiceSettings, SettingsError, load_settings

SERVICES = ("numberdistribution", "callmatching", "routing", "presence", "notification")


def settings_type(service: str) -> type[ServiceSettings]:
    module = importlib.import_module(f"accessline_server.{service}.settings")
    found: type[ServiceSettings] = next(
        value
        for name, value in vars(module).items()
        if name.endswith("Settings")
        and isinstance(value, type)
        and issubclass(value, ServiceSettings)
        and value.__module__ == module.__name__  # its own, not a base it imports
    )
    return found


def default_port(service: str, field: str = "port") -> int:
    value: int = settings_type(service).model_fields[field].default
    return value


def serve(service: str) -> None:
    module = importlib.import_module(f"accessline_server.{service}.__main__")
    module.main()


# The SIP edge's event socket (Kamailio to the adapter), on loopback only.
SIP_EVAPI_PORT = 8448


def web_port(service: str) -> int:
    """A service's Connect and gRPC-Web port in the embedded run: 8451 to 8455, beside its
    gRPC port 50051 to 50055 (Presence's, 8454, also serves the agent console)."""
    return default_port(service) - 50051 + 8451


@dataclass
class Child:
    service: str
    port: int
    metrics_port: int
    process: subprocess.Popen[bytes]


async def list_audit(args: argparse.Namespace) -> int:
    from sqlalchemy.exc import SQLAlchemyError

    from accessline_server.runtime.audit import list_events

    since = int((time.time() - args.since) * 1e6) if args.since is not None else None
    try:
        found, _ = await list_events(
            args.dsn,
            limit=args.limit,
            since_us=since,
            subject=args.subject,
            denied_only=args.denied,
        )
    except (SQLAlchemyError, OSError) as exc:
        print(f"accessline audit: cannot read {args.dsn}: {type(exc).__name__}", file=sys.stderr)
        return 1
    for event in found:
        if args.json:
            print(json.dumps(event, sort_keys=True))
            continue
        when = datetime.datetime.fromtimestamp(event["at_us"] / 1e6, datetime.UTC)
        who = event["subject"] or event["service"] or "(anonymous)"
        roles = f" [{event['roles']}]" if event["roles"] else ""
        target = f" {event['target']}" if event["target"] else ""
        reason = f" {event['reason']}" if event["reason"] else ""
        print(
            f"{when:%Y-%m-%d %H:%M:%S}Z  {who}{roles}  {event['action']}{target}"
            f"  {event['outcome']}{reason}  {event['method']}  trace {event['trace_id'] or '-'}"
        )
    return 0


def serve_jwks(jwks: Path, host: str, port: int) -> int:
    """Serves `jwks` at /jwks.json until SIGINT or SIGTERM."""
    if not jwks.is_file():
        print(f"accessline issuer: no JWKS at {jwks}", file=sys.stderr)
        return 1
    server = devpki.JwksServer(jwks, host, port)
    print(f"serving {jwks} at {server.url}", flush=True)
    stopped = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopped.set())
    stopped.wait()
    server.close()
    return 0


async def up(
    data_dir: Path, etcd_port: int, etcd_peer_port: int, host: str, sip_port: int = 0
) -> int:
    # TLS and tokens are on in the embedded run too: its own CA, certificates, signing
    # key and JWKS, made the first time under the data folder.
    identity = devpki.ensure(data_dir / "identity")
    jwks = devpki.JwksServer(identity.jwks, host)
    etcd = EmbeddedEtcd(
        data_dir / "etcd",
        etcd_port,
        etcd_peer_port,
        host=host,
        extra_args=identity.etcd_server_args(),
        client_tls=identity.etcd_client("numberdistribution"),
    )
    print(f"starting etcd on {etcd.endpoint} (data in {etcd.data_dir})", flush=True)
    etcd.start()
    children: list[Child] = []
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await etcd.wait_ready()
        children += _spawn_services(data_dir, host, etcd.endpoint, identity, jwks.url)
        probe = identity.credentials()
        await asyncio.gather(
            *(
                processes.wait_serving(f"{host}:{c.port}", c.process, c.service, 30.0, probe)
                for c in children
            )
        )
        if sip_port:
            children += await _spawn_sip_edge(data_dir, host, sip_port, identity)
        _print_up(children, host, data_dir, etcd, identity.folder, jwks.url)
        await _watch_children(children, stop)
        return 0
    except (TimeoutError, RuntimeError) as exc:
        print(f"accessline up: {exc}", file=sys.stderr)
        return 1
    finally:
        print("stopping services...", flush=True)
        processes.stop([c.process for c in children], timeout=15.0)
        etcd.stop()
        jwks.close()
        print("stopped.", flush=True)


def _console_env(service: str, host: str) -> dict[str, str]:
    """The agent console (on Presence's web port) sends links through Notification's."""
    console, notification = (f"https://{host}:{web_port(s)}" for s in ("presence", "notification"))
    if service == "presence":
        return {"ACCESSLINE_PRESENCE_CONSOLE_NOTIFICATION_URL": notification}
    if service == "notification":
        return {"ACCESSLINE_WEB_CORS_ORIGINS": console}
    return {}


def _spawn_services(
    data_dir: Path, host: str, etcd_endpoint: str, identity: devpki.DevIdentity, jwks_url: str
) -> list[Child]:
    """The five services started on their default ports, each logging to its file."""
    children: list[Child] = []
    for service in SERVICES:
        port, metrics_port = default_port(service), default_port(service, "metrics_port")
        env = {
            "ACCESSLINE_ETCD_ENDPOINTS": etcd_endpoint,
            "ACCESSLINE_HOST": host,
            "ACCESSLINE_PORT": str(port),
            "ACCESSLINE_METRICS_PORT": str(metrics_port),
            "ACCESSLINE_WEB_PORT": str(web_port(service)),
            **_console_env(service, host),
            "ACCESSLINE_HISTORY_DSN": os.environ.get(
                "ACCESSLINE_HISTORY_DSN",
                f"sqlite+aiosqlite:///{(data_dir / 'match-history.db').resolve()}",
            ),
            "ACCESSLINE_AUDIT_DSN": os.environ.get(
                "ACCESSLINE_AUDIT_DSN",
                f"sqlite+aiosqlite:///{(data_dir / 'audit.db').resolve()}",
            ),
            **identity.service_env(service, jwks_url),
        }
        with (data_dir / f"{service}.log").open("ab") as log:
            process = processes.spawn(f"accessline_server.{service}", env, stdout=log)
        children.append(Child(service, port, metrics_port, process))
    return children


async def _spawn_sip_edge(
    data_dir: Path, host: str, sip_port: int, identity: devpki.DevIdentity
) -> list[Child]:
    """Kamailio on `host:sip_port` (UDP) and the SIP adapter routing its calls through
    Routing as a switch (the development identity's client certificate and a token)."""
    from accessline_server.sipedge.edge import kamailio_command

    evapi = f"127.0.0.1:{SIP_EVAPI_PORT}"
    run_dir = data_dir / "kamailio"
    run_dir.mkdir(exist_ok=True)
    with (data_dir / "kamailio.log").open("ab") as log:
        kamailio = subprocess.Popen(
            kamailio_command(f"udp:{host}:{sip_port}", evapi, run_dir),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    env = {
        "ACCESSLINE_ROUTING_ADDRESS": f"{host}:{default_port('routing')}",
        "ACCESSLINE_SIPEDGE_EVAPI_ADDRESS": evapi,
        "ACCESSLINE_SIPEDGE_TOKEN": identity.token(
            "sip-edge", ["switch"], switch="*", ttl=30 * 86400.0
        ),
        "ACCESSLINE_TLS_CA_FILE": str(identity.ca),
        "ACCESSLINE_TLS_CERT_FILE": str(identity.client_cert("admin")),
        "ACCESSLINE_TLS_KEY_FILE": str(identity.client_key("admin")),
    }
    with (data_dir / "sipedge.log").open("ab") as log:
        adapter = processes.spawn("accessline_server.sipedge", env, stdout=log)
    return [Child("kamailio", sip_port, 0, kamailio), Child("sipedge", 0, 0, adapter)]


def _print_up(
    children: list[Child],
    host: str,
    data_dir: Path,
    etcd: EmbeddedEtcd,
    folder: Path,
    jwks_url: str,
) -> None:
    print("\nAccessline is up:\n")
    print(f"  {'service':<20}{'gRPC':<22}{'Connect, gRPC-Web':<24}{'metrics':<30}log")
    for c in children:
        where = f"{host}:{c.port}" if c.port else ""
        web = f"https://{host}:{web_port(c.service)}" if c.service in SERVICES else ""
        if c.service == "kamailio":
            where = f"sip:{host}:{c.port}"
        metrics = f"http://{host}:{c.metrics_port}/metrics" if c.metrics_port else ""
        log = data_dir / (c.service + ".log")
        print(f"  {c.service:<20}{where:<22}{web:<24}{metrics:<30}{log}")
    print(f"  {'etcd':<20}{etcd.endpoint:<22}{'':<24}{'':<30}{etcd.log_file}")
    print(
        f"\nAgent console: https://{host}:{web_port('presence')}/console/ (certificate of the"
        f" development CA {folder}/ca.pem);\nsign in with an agent's token:"
        " .venv/bin/accessline token --role agent --subject <agent id>"
    )
    print(
        f"\nTLS and tokens are on (development identity in {folder}; tokens from"
        f" {jwks_url}).\nMint a token, then call a service with buf curl:\n"
        "  TOKEN=$(.venv/bin/accessline token --role admin --subject me)\n"
        f"  node_modules/.bin/buf curl --protocol grpc --cacert {folder}/ca.pem"
        f" --cert {folder}/client-admin.pem --key {folder}/client-admin.key \\\n"
        '    -H "Authorization: Bearer $TOKEN" --list-methods'
        f" https://{host}:{children[0].port}"
    )
    print("\nPress Ctrl-C to stop.", flush=True)


async def _watch_children(children: list[Child], stop: asyncio.Event) -> None:
    """Returns on Ctrl-C (`stop`), or as soon as a service exits."""
    while not stop.is_set():
        for c in children:
            if c.process.poll() is not None:
                print(
                    f"{c.service} exited with status {c.process.returncode}; stopping", flush=True
                )
                stop.set()
                return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.5)


async def migrate_history(dsn: str | None) -> int:
    from accessline_server.callmatching.history import migrate
    from accessline_server.callmatching.settings import CallMatchingSettings

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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="accessline", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve_p = sub.add_parser("serve", help="run one service in the foreground")
    serve_p.add_argument("service", choices=SERVICES)
    up_p = sub.add_parser("up", help="run etcd and all five services on this machine")
    up_p.add_argument("--data-dir", type=Path, default=Path(".accessline"))
    up_p.add_argument("--etcd-port", type=int, default=2379)
    up_p.add_argument("--etcd-peer-port", type=int, default=2380)
    up_p.add_argument("--host", default="127.0.0.1")
    up_p.add_argument(
        "--sip",
        type=int,
        nargs="?",
        const=5060,
        default=0,
        metavar="PORT",
        help="also run the SIP edge: Kamailio on this UDP port (5060) and the SIP adapter",
    )
    _add_demo(sub)
    _add_token(sub)
    _add_audit(sub)
    issuer_p = sub.add_parser(
        "issuer", help="serve a development identity's JWKS (its token issuer's public keys)"
    )
    issuer_p.add_argument("--jwks", type=Path, default=Path(".accessline/identity/jwks.json"))
    issuer_p.add_argument("--host", default="127.0.0.1")
    issuer_p.add_argument("--port", type=int, default=8080)
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
    return parser


# The subcommands of the parser (argparse names the type privately).
Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def _add_demo(sub: Subparsers) -> None:
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
    demo_p.add_argument(
        "--identity",
        type=Path,
        default=Path(".accessline/identity"),
        help="the development identity to connect with (none there: plain text)",
    )


def _add_token(sub: Subparsers) -> None:
    token_p = sub.add_parser(
        "token", help="mint a development bearer token (signed with `make up`'s key)"
    )
    token_p.add_argument(
        "--role",
        action="append",
        required=True,
        choices=sorted(ROLES_BY_NAME),
        help="a role of the token (repeat for several)",
    )
    token_p.add_argument("--subject", required=True, help="the caller: agent or customer id, …")
    token_p.add_argument(
        "--application", action="append", default=[], help="an application it acts for"
    )
    token_p.add_argument("--switch", default="", help="the switch id of a switch's token")
    token_p.add_argument("--ttl", type=float, default=3600.0, help="seconds it is valid")
    token_p.add_argument("--identity", type=Path, default=Path(".accessline/identity"))


def _add_audit(sub: Subparsers) -> None:
    audit_p = sub.add_parser(
        "audit", help="list the audit trail: changes and refused calls, newest first"
    )
    audit_p.add_argument(
        "--dsn",
        default=os.environ.get("ACCESSLINE_AUDIT_DSN", "sqlite+aiosqlite:///.accessline/audit.db"),
        help="the audit database (default: ACCESSLINE_AUDIT_DSN, else `make up`'s)",
    )
    audit_p.add_argument("--limit", type=int, default=50)
    audit_p.add_argument("--since", type=float, help="only events of the last SECONDS")
    audit_p.add_argument("--subject", default="", help="only events of this caller")
    audit_p.add_argument("--denied", action="store_true", help="only refused calls")
    audit_p.add_argument("--json", action="store_true", help="one JSON object per line")


def _token(args: argparse.Namespace) -> int:
    found = devpki.DevIdentity(args.identity)
    if not found.exists():
        print(
            f"accessline token: no development identity in {args.identity}; run `make up`",
            file=sys.stderr,
        )
        return 1
    print(
        found.token(
            args.subject,
            args.role,
            applications=args.application,
            switch=args.switch,
            ttl=args.ttl,
        )
    )
    return 0


def _demo(args: argparse.Namespace) -> int:
    from accessline_server.demo import Addresses, development_access, play

    addresses = Addresses(args.numbers, args.matching, args.routing, args.presence)
    try:
        asyncio.run(
            play(
                addresses,
                args.calls,
                args.agents,
                args.concurrency,
                access=development_access(args.identity),
            )
        )
    except grpc.aio.AioRpcError as error:
        print(
            f"accessline demo: {error.code().name}: {error.details()} (is `make up` running?)",
            file=sys.stderr,
        )
        return 1
    return 0


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.command == "token":
        if _token(args):
            sys.exit(1)
        return
    if args.command == "audit":
        sys.exit(asyncio.run(list_audit(args)))
    if args.command == "issuer":
        sys.exit(serve_jwks(args.jwks, args.host, args.port))
    if args.command == "history":
        sys.exit(asyncio.run(migrate_history(args.dsn)))
    if args.command == "numbers":
        sys.exit(numbers_cli.run(args))
    if args.command == "demo":
        if _demo(args):
            sys.exit(1)
        return
    if args.command == "serve":
        serve(args.service)
    elif args.command == "up":
        args.data_dir.mkdir(parents=True, exist_ok=True)
        sys.exit(
            asyncio.run(up(args.data_dir, args.etcd_port, args.etcd_peer_port, args.host, args.sip))
        )


if __name__ == "__main__":
    main()
