"""Accessline's five gRPC services and the runtime they share."""
