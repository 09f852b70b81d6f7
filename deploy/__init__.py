"""deploy/: the version registry (records, states, audit log), manifests, hot swap into
vLLM replicas, and the operator (admin) routes."""
