"""NumberDistribution: Hands out access numbers: pools, nearest-city reservations under
etcd leases, access codes, quarantine.

Published modules (the only ones another service may import):
reservations: ending a reservation (and starting its quarantine) inside another
service's transaction, as CallMatching does when a call matches.
dialled: reading what a dialled number holds (pool, reservations, codes checked) inside
another service's read, as CallMatching does for every call; the access codes' secret."""

PUBLISHED: tuple[str, ...] = ("reservations", "dialled")
