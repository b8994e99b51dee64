"""The `trace` commands, one module per command group; cli.py assembles them into the Typer app.

Each command is a typed function whose docstring is its help: it parses its options, calls the library and
prints the result. At the top a module imports only what its options need (their defaults and choices); the
engines, the report's plotting and the rest are imported inside the command bodies, so `trace --help` stays fast."""
