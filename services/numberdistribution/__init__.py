"""NumberDistribution: Hands out access numbers: pools, nearest-city reservations under
etcd leases, access codes, quarantine."""
