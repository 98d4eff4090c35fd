"""What identity and access cost on the call path: StartHandoff and MatchCall with mutual
TLS on every link (clients, peers, etcd) and a verified JWT on every call, against the
same with ACCESSLINE_INSECURE, both measured in this run on fresh processes.

    python -m bench.security_bench [--count N] [--concurrency C]
"""

from __future__ import annotations

import argparse
import asyncio

from bench.common import Result, secured
from bench.match_bench import call_matching_round


def print_ratios(plain: list[Result], secure: list[Result]) -> None:
    print(
        f"\n{'operation':<34}{'plain p50 ms':>14}{'secure p50 ms':>15}{'ratio':>8}"
        f"{'plain ops/s':>13}{'secure ops/s':>14}"
    )
    for a, b in zip(plain, secure, strict=True):
        name = a.name.split(",")[0]
        ratio = b.p50_ms / a.p50_ms if a.p50_ms else float("nan")
        print(
            f"{name:<34}{a.p50_ms:>14.2f}{b.p50_ms:>15.2f}{ratio:>8.2f}"
            f"{a.per_second:>13.0f}{b.per_second:>14.0f}"
        )


async def main(count: int, concurrency: int) -> None:
    plain = await call_matching_round(count, concurrency)
    async with secured() as security:
        secure = await call_matching_round(count, concurrency, security)
    print(f"\nsecurity cost, {count} handoffs, {concurrency} concurrent (p50 ratio: secure/plain)")
    print_ratios(plain, secure)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    asyncio.run(main(args.count, args.concurrency))
