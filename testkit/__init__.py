"""Support for the tests and the benchmarks: a tiny random model and LoRA adapters, free ports,
waiting for a server. Never imported by the product."""
