"""User-facing errors: a message, optional hints, never a traceback.

Every error a user can cause by their config, data or environment is raised as
`LexAlignError`. The CLI and the Snakemake scripts print it as

    Error: <message>
    <detail lines>
    → <hint>

and exit with status 1.
"""

from __future__ import annotations

import sys


class LexAlignError(Exception):
    """An error with a message a user can act on."""

    def __init__(self, message: str, *details: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.details = [d for d in details if d]
        self.hint = hint

    def render(self) -> str:
        lines = [f"Error: {self.message}", *self.details]
        if self.hint:
            lines.append(f"→ {self.hint}")
        return "\n".join(lines)


class TrainingInterrupted(LexAlignError):
    """Ctrl+C or SIGTERM stopped training after a checkpoint was saved."""

    def __init__(self, checkpoint, resume_command: str):
        super().__init__(f"Training interrupted. Checkpoint saved to: {checkpoint}")
        self.checkpoint = checkpoint
        self.resume_command = resume_command

    def render(self) -> str:
        return f"{self.message}\nResume with: {self.resume_command} --resume {self.checkpoint}"


def warn(message: str, *details: str) -> None:
    """Print a warning the way users expect to see it: on stderr, plainly."""
    print("\n".join([f"Warning: {message}", *details]), file=sys.stderr, flush=True)
