"""Command-line front end of edje-search (installed as the package ``edje_search_cli``)."""
