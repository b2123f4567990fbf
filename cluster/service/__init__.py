"""The service on Ray: its settings and names (`spec`), finding it (`lookup`), starting and stopping
it (`launch`), the router replicas as actors (`router_actor`), the Python client (`client`), the
embedded index's host actor (`redis_host`), the numbers people read (`stats`, `history`).

Nothing is imported here: the dashboard reads `stats` and `history` without Ray or torch.
"""
