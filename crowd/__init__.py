"""The simulated crowd: judges (crowd/judges.py), voters that use the public HTTP API
(crowd/simulate.py) and head-to-head evaluation without votes (crowd/evaluate.py)."""
