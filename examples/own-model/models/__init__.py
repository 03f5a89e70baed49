"""This project's own models: atoll's are `atoll.models`, so the names never clash."""
