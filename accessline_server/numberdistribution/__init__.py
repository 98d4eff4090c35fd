"""NumberDistribution: Hands out access numbers: pools, nearest-city reservations under
etcd leases, access codes, quarantine.

Published modules (the only ones another service may import):
reservations: ending a reservation (and starting its quarantine) inside another
service's transaction, as CallMatching does when a call matches."""

PUBLISHED: tuple[str, ...] = ("reservations",)
