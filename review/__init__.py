"""Review tooling: the pull-request report."""
