"""Starting the SIP edge next to the services: Kamailio with the repository's
configuration and the SIP adapter connected to its event socket."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

from accessline_server.runtime.embedded_etcd import free_port

CONFIG = Path(__file__).resolve().parent.parent.parent / "sip" / "kamailio.cfg"


def kamailio_command(
    sip_listen: str, evapi_bind: str, run_dir: Path, config: Path = CONFIG
) -> list[str]:
    """Kamailio in the foreground, logging to stderr: SIP on `sip_listen`
    (`udp:HOST:PORT`), its event socket on `evapi_bind` (`HOST:PORT`)."""
    kamailio = shutil.which("kamailio") or shutil.which("kamailio", path="/usr/sbin:/sbin")
    if kamailio is None:
        raise RuntimeError(
            "Kamailio is not installed: `sudo tools/ensure-test-deps.sh` installs it"
            " (Debian's kamailio, kamailio-extra-modules and kamailio-json-modules)"
        )
    return [
        kamailio,
        "-DD",
        "-E",
        "-f",
        str(config),
        "-Y",
        str(run_dir),
        "-l",
        sip_listen,
        "-A",
        f'EVAPI_BIND="{evapi_bind}"',
    ]


def free_udp_port(host: str = "127.0.0.1") -> int:
    """A UDP port free on `host` right now, as `free_port` picks them."""
    return free_port(host, socket.SOCK_DGRAM)
