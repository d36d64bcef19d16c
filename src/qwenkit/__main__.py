"""`python -m qwenkit ...` (and `torchrun -m qwenkit train ...`): the `qwenkit` command."""
from qwenkit.cli.main import main

raise SystemExit(main())
