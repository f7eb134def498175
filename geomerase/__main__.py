import sys

from geomerase.cli import main

sys.exit(main())
