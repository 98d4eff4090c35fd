"""CallMatching: Stores the app's context for a handoff and matches the voice call to it
exactly once."""
