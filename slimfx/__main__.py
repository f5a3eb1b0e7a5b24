"""``python -m slimfx`` (what ``torchrun -m slimfx optimize ...`` runs): the command line."""

from slimfx.cli import main

raise SystemExit(main())
