"""The command line: the Typer app and the generator of docs/cli.md."""
