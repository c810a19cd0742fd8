import sys

from premier.cli import main

sys.exit(main())
