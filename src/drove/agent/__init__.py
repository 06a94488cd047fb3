"""The node agent: processes, disks and host attach of one node."""
