"""The control plane's Prometheus metrics: ``GET /metrics`` in the text exposition format.

``counters`` keeps what happens (requests, node syncs) in Redis, shared by every
control-plane process; ``collect`` reads what is (rollouts, nodes, queries,
Celery queues) at scrape time; ``exposition`` writes the text format;
``views`` guards the endpoint (see its docstring for who may read it).
"""
