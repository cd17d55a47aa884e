"""`python -m mistral_train ...` is the `mistral-train` command (and what `accelerate launch -m` runs)."""

from mistral_train.cli import main

raise SystemExit(main())
