"""`python -m qwenkit.serve [MODEL] [options]` — same as `qwenkit serve`."""
from qwenkit.serve.cli import main

raise SystemExit(main())
