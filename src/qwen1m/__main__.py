"""``python -m qwen1m ...`` runs the CLI (the same as the ``qwen1m`` command)."""

from qwen1m.cli import main

raise SystemExit(main())
