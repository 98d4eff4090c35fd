"""The runtime every Accessline service stands on: settings, the etcd store, errors,
telemetry, logs and the gRPC server bootstrap."""
