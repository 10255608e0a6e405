import sys

from launcher.plan.cli import main

sys.exit(main())
