"""Demo and test helpers: a local S3-compatible server and a replica of the production bucket."""
