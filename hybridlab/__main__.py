import sys

from hybridlab._checkout import keep_checkout_last

keep_checkout_last()  # before anything imports transformers (which imports `kernels`)

from hybridlab.cli import main  # noqa: E402

sys.exit(main())
