"""One function per pipeline step (TODO)."""
