"""`python -m ovis25 ...` is the `ovis25` command."""
from .cli import main

raise SystemExit(main())
