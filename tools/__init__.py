"""Development tools, run from a source checkout (``python -m tools.<name>``); not part of the installed package."""
