"""Notification: Devices, subscriptions and push delivery through a durable outbox."""
