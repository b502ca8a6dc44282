"""The `flyio-image-manager` and `fsm` commands: thin, no logic of their own."""
