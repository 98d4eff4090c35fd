"""Accessline's SIP edge: the adapter between a Kamailio SIP proxy and Routing."""
