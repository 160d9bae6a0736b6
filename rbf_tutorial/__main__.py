"""`python -m rbf_tutorial ...` is the `rbf-tutorial` command."""

from .cli import main

raise SystemExit(main())
