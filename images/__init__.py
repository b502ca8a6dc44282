"""Object sources (s3://, file://), the content-addressed blob store, format detection and verification."""
