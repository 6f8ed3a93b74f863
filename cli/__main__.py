import sys

from fedmoe.cli.main import main

sys.exit(main())
