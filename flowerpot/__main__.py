import sys

from flowerpot.cli import main

sys.exit(main())
