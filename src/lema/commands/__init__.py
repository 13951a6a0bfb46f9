"""One module per `lema` command; see lema/cli.py for the contract each follows."""
