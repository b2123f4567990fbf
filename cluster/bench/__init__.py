"""`prefixcache bench`: workloads, modes, report. Importing this package is light (the CLI reads PARTS)."""

PARTS = ("service", "batching")  # `prefixcache bench --only PART` reruns one, keeping the other's numbers
