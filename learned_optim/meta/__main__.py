"""``python -m learned_optim.meta train CONFIG``: see :mod:`learned_optim.meta.cli`."""

from .cli import main

raise SystemExit(main())
