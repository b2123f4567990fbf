"""The OpenAI-compatible HTTP API: a Ray Serve application whose FastAPI ingress replicas call the router.

errors.py    OpenAI's error shape, the status each failure maps to, the catch-all for faults (JSON 500s)
keys.py      --api-keys FILE: API key -> tenant (the router derives the tenant's cache salt)
protocol.py  request bodies -> (prompt, Request fields), every check with a message naming the field
schema.py    pydantic models of the bodies for /openapi.json and /docs (protocol.py validates)
responses.py response bodies, usage (with prompt_tokens_details.cached_tokens) and SSE chunks
stream.py    SSE streaming from the router, usage on chunks, errors after the first byte
metrics.py   /metrics: request metrics of the ingress + the cluster's cache metrics (the dashboard's)
cors.py      --allowed-origins: CORS, off by default
chat.py      chat messages -> prompt token ids through the model's chat template
app.py       the FastAPI routes and the Serve deployment
server.py    start / stop the application on a Ray cluster (Cluster.start(http_port=...), `prefixcache start`)
"""
