"""One module per `masep` command, each with `add_arguments(parser)` and `run(args) -> int`."""
