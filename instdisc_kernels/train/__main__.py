"""``python -m instdisc_kernels.train`` (and ``torchrun -m instdisc_kernels.train``)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
