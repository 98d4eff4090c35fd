"""Routing: Routes inbound calls to the right agent: match-aware selection, agent
reservation, offers, queue.

It publishes no module: other services reach it through its gRPC contract only."""

PUBLISHED: tuple[str, ...] = ()
