"""``python -m sweep.sync``: copy the offline MLflow stores of a sweep's runs to the server (sweep.offline)."""

import sys

from sweep.offline import main

if __name__ == "__main__":
    sys.exit(main())
