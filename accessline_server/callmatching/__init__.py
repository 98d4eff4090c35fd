"""CallMatching: Stores the app's context for a handoff and matches the voice call to it
exactly once.

It publishes no module: other services reach it through its gRPC contract only."""

PUBLISHED: tuple[str, ...] = ()
