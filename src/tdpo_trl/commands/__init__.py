"""The `tdpo-trl` command: `cli` parses and dispatches; `train`, `demo` (HfArgumentParser commands) and `evaluate` (in
`cli`) each build what they run from library calls. `examples/` scripts call the same functions."""
