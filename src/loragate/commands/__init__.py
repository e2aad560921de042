"""One module per ``loragate`` subcommand: ``HELP``, ``add_arguments(parser)``, ``run(args)``."""
