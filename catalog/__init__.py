"""What the host holds: images, layers, unpacked layer devices, snapshots, orphans."""
