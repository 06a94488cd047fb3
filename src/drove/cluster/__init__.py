"""drove across many hosts: the agent process, the etcd store, leadership, node health."""
