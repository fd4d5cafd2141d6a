import sys

from semid_dist.cli import main

sys.exit(main())
