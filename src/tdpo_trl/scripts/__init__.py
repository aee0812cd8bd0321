"""Entry points of the `tdpo-trl` command (`train`, `demo`); `examples/` scripts call the same functions."""
