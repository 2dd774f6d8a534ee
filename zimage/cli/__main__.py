import sys

from zimage.cli import main

sys.exit(main())
