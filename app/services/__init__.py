"""Business logic: queries, rules and commits. No FastAPI imports here."""
