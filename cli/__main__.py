"""`python -m edje_search_cli ...` (e.g. under torchrun) is the same as `edje-search ...`."""
from edje_search_cli.main import main

main()
