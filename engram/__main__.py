"""`python -m engram ARGS` is the `engram` command."""

from engram.cli import main

raise SystemExit(main())
