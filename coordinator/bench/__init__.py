"""The speed benchmark: the cluster's epoch time, traffic and memory against the one-process floor."""
