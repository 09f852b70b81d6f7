"""Glue of rlhf-arena: the settings object, the `arena` CLI, the launcher, model preparation."""
