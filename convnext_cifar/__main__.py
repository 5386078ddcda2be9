import sys

from convnext_cifar.cli import main

sys.exit(main())
