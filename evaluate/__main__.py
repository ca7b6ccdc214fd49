"""``python -m zoo.evaluate`` (and ``torchrun -m zoo.evaluate``) = ``zoo-eval``."""

from .cli import main

raise SystemExit(main())
