"""`python -m reference` is the `reference` console script."""

from reference.cli import main

raise SystemExit(main())
