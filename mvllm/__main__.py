"""Allows `python -m mvllm ...`, used wherever a subprocess must run our own CLI."""

from mvllm.cli import main

raise SystemExit(main())
