"""The production bucket: where images are read from unless --bucket says otherwise. Its
own module so the CLI's option defaults need nothing heavy."""

DEFAULT_BUCKET = "flyio-platform-hiring-challenge"
