"""Notification: Devices, subscriptions and push delivery through a durable outbox.

It publishes no module: other services reach it through its gRPC contract only."""

PUBLISHED: tuple[str, ...] = ()
