"""`python -m ditkit` is the `ditkit` command."""

from ditkit.cli import main

raise SystemExit(main())
