"""The product's top-level commands are attached here as they land."""
