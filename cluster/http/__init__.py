"""The OpenAI-compatible HTTP API: a Ray Serve application whose FastAPI ingress replicas call the router.

errors.py    OpenAI's error shape and the status each failure maps to
keys.py      --api-keys FILE: API key -> tenant (the router derives the tenant's cache salt)
protocol.py  request bodies -> (prompt, Request fields), every check with a message naming the field
responses.py response bodies, usage (with prompt_tokens_details.cached_tokens) and SSE chunks
app.py       the FastAPI routes and the Serve deployment
server.py    start / stop the application on a Ray cluster (Cluster.start(http_port=...), `prefixcache start`)
"""
