"""The top of rlhf-arena: the `arena` CLI, the launcher (`arena up`), the consumers' runner
and model preparation. Imports every package; no package of the product imports it."""
