"""The built-in demo: a tiny model and a task where alignment has a checkable effect."""
