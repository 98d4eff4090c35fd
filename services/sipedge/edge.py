"""Starting the SIP edge next to the services: Kamailio with the repository's
configuration and the SIP adapter connected to its event socket."""

from __future__ import annotations

import shutil
from pathlib import Path

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
