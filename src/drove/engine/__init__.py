"""The engine: one process per attached volume, mirroring writes to its replicas."""
