"""`thinkbroad distill` training only the named variants (comma-separated, first argument), for bench/code_parity.py.
Runs under either code (PYTHONPATH picks which): both have DistillConfig.main_variants and workflows.cli.main."""
import sys

import student.config as config

KEEP = set(sys.argv[1].split(","))
_all = config.DistillConfig.main_variants
config.DistillConfig.main_variants = lambda self: [v for v in _all(self) if v.name in KEEP]

from workflows.cli import main  # noqa: E402

sys.exit(main(sys.argv[2:]))
