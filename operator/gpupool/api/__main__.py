"""``python -m gpupool.api``: the same as ``gpupool api``."""

import sys

from gpupool.api.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
