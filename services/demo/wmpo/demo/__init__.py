"""The end-to-end demo (`wmpo demo`): WMPO on the local stack, from data collection to an HTML report."""
