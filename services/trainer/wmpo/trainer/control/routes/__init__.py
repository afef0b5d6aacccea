"""The control plane's HTTP routes, one `APIRouter` per concern (health, runs, versions)."""
