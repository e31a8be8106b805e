"""Cross-cutting pieces of the service: settings, database, errors, blob store, queue and event bus."""
