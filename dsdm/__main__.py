"""`python -m dsdm ...` is the `dsdm` command."""

from dsdm.cli import main

raise SystemExit(main())
