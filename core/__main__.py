"""`python -m stacktrain ...` is the `stacktrain` command (also under `torchrun --no-python stacktrain`)."""

import sys

from stacktrain.cli import main

sys.exit(main())
