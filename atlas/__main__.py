import sys

from atlas.cli.main import main

sys.exit(main())
