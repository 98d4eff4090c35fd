"""How Accessline's command-line tools reach the services: mutual TLS with a client
certificate of the deployment's CA and a bearer token of its issuer, given as files and a
token (flags or ACCESSLINE_CLIENT_* / ACCESSLINE_TOKEN), or taken from a development
identity (`make up`'s, which also signs an admin token for the tool); plain text only
with --insecure, against services run with ACCESSLINE_INSECURE."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import grpc

from accessline_server.runtime.devpki import DevIdentity

DEFAULT_IDENTITY = Path(".accessline/identity")


class NoCredentials(Exception):
    """Nothing says how to authenticate."""


def add_client_arguments(parser: argparse.ArgumentParser) -> None:
    env = os.environ.get
    parser.add_argument(
        "--ca-file",
        default=env("ACCESSLINE_CLIENT_CA_FILE", ""),
        help="CA of the services' certificates (ACCESSLINE_CLIENT_CA_FILE)",
    )
    parser.add_argument(
        "--cert-file",
        default=env("ACCESSLINE_CLIENT_CERT_FILE", ""),
        help="client certificate (ACCESSLINE_CLIENT_CERT_FILE)",
    )
    parser.add_argument(
        "--key-file",
        default=env("ACCESSLINE_CLIENT_KEY_FILE", ""),
        help="client key (ACCESSLINE_CLIENT_KEY_FILE)",
    )
    parser.add_argument(
        "--token",
        default=env("ACCESSLINE_TOKEN", ""),
        help="bearer token of your issuer (ACCESSLINE_TOKEN)",
    )
    parser.add_argument(
        "--identity",
        type=Path,
        default=DEFAULT_IDENTITY,
        help="a development identity (`make up`'s) to use when no files are given",
    )
    parser.add_argument(
        "--insecure", action="store_true", help="plain text, no token (ACCESSLINE_INSECURE)"
    )


def client_channel(args: argparse.Namespace, address: str, role: str = "admin") -> grpc.aio.Channel:
    """A channel to `address` as the arguments say; raises NoCredentials when they say
    nothing usable."""
    if args.insecure:
        return grpc.aio.insecure_channel(address)
    if args.ca_file or args.cert_file or args.key_file:
        if not (args.ca_file and args.cert_file and args.key_file and args.token):
            raise NoCredentials("--ca-file, --cert-file, --key-file and --token go together")
        tls = grpc.ssl_channel_credentials(
            root_certificates=Path(args.ca_file).read_bytes(),
            private_key=Path(args.key_file).read_bytes(),
            certificate_chain=Path(args.cert_file).read_bytes(),
        )
        return grpc.aio.secure_channel(
            address,
            grpc.composite_channel_credentials(tls, grpc.access_token_call_credentials(args.token)),
        )
    found = DevIdentity(args.identity)
    if not found.exists():
        raise NoCredentials(
            f"no credentials: give --ca-file, --cert-file, --key-file and --token, or a"
            f" development identity (none in {args.identity}; `make up` makes one)"
        )
    token = args.token or found.token("accessline-cli", [role], ttl=600)
    return found.channel(address, token)
