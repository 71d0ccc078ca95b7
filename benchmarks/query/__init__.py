"""Federated query benchmark: the node's data engine against DuckDB, and one query across many sites."""
