"""``python -m gpupool.gateway``: the same as ``gpupool gateway``."""

import sys

from gpupool.gateway.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
