"""CallMatching: Stores the app's context for a handoff and matches the voice call to it
exactly once.

Other services reach it through its gRPC contracts, and record what they do in the
customers' journey through its published `journey.records` module."""

PUBLISHED: tuple[str, ...] = ("journey.records",)
