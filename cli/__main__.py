"""`python -m cli ...` is `flyio-image-manager ...` (for running from a checkout)."""

from cli.main import main

main()
