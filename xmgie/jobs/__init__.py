"""The job domain shared by the API and the workers: settings, database, state transitions, storage."""
