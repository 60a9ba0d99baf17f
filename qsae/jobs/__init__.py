"""Jobs: what the flows and the CLI call. Each has a pydantic config and plain functions
(plan, a step mapped over shards or blocks, finish) that a notebook can call without Prefect:
capture, collect, train, rivalry, reconstruction, compare, and the CPU demos."""
