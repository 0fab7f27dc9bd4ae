import sys

try:
    from .cli import main
except KeyboardInterrupt:  # Ctrl-C while Python starts up: one line, no traceback
    sys.stderr.write("error: interrupted; nothing was written to --output\n")
    sys.exit(130)

sys.exit(main())
