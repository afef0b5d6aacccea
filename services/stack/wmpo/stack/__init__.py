"""The local stack: every wmpo service as a local process (`wmpo stack up|down|status|logs`)."""
