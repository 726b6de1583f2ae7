import sys

from pnnh.cli import main

sys.exit(main())
