"""The bottom of the import graph: the settings object and the helpers every package uses
(secrets, Redis text, hardware, the vLLM command). Imports nothing of ours."""
