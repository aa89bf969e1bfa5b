"""`python -m devicekit`."""

import sys

from devicekit._cli import main

if __name__ == "__main__":
    sys.exit(main())
