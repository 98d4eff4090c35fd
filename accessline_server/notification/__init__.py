"""Notification: Devices, subscriptions and push delivery through a durable outbox;
webhooks of the applications' backends.

It publishes `events` (the write of a webhook event in another service's transaction) and
`surveys` (the write of a survey invitation in the transaction that ends an agent's
interaction); otherwise other services reach it through its gRPC contract only."""

PUBLISHED: tuple[str, ...] = ("events", "surveys")
