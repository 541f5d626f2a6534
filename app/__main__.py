import sys

from app.main import main

# Guarded: the training process is started with multiprocessing's "spawn", which imports the main module again.
if __name__ == "__main__":
    sys.exit(main())
