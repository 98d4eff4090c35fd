"""Routing: Routes inbound calls to the right agent: match-aware selection, agent
reservation, offers, queue."""
