"""The customer's journey: every interaction a customer had with the contact center,
in the history database. CallMatching owns it (its schema, its migrations, the
JourneyService that reads it); `records` is its published module, through which Routing
and Notification record what they do."""
