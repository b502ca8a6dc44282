"""The image job: its workflow definition and one module per state."""
