"""The `nnm` command line."""
