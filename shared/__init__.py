"""The loyalty platform's common package: events, Kafka plumbing, database, auth, errors, observability."""
