"""``python -m charlm``: the command line."""
from charlm.cli import main

if __name__ == "__main__":
    main()
