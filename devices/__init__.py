"""Thin-pool backends behind one interface (devices.base.ThinPool)."""
